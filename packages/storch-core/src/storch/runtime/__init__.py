"""How storch's own calls run: eagerly inside ``torch.compile`` (``eager``), drawing from the graph's generator
(``generators``).

Both are a bottom layer: the plate dispatcher (plates/), distributions/rsample_kinks and the graph import them while
storch loads, so they cannot live in compiled/ or graph/, which import those layers. Empty on purpose: importing
one module does not load the other.
"""
