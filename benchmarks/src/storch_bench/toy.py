class ToyConfig: pass
def run_toy(*a): pass
