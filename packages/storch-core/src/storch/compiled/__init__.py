"""``storch.compile``: a storch step traced once into plain batched torch, then compiled.

``torch.compile`` cannot trace plate tensors well: dynamo does not construct tensor wrapper
subclasses inside a graph, so every torch call on a :class:`storch.PlateTensor` is a graph break
(and storch's bookkeeping in between runs as many small frames). ``storch.compile(step)`` takes the
other route. The first call with a given signature (the shapes, strides, dtypes, devices and
``requires_grad`` of the tensor arguments, the other arguments' values, grad mode) runs ``step``
once with storch's Python dispatch under ``make_fx(pre_dispatch=True)``: storch does its plate
alignment, estimator and surrogate bookkeeping on the real tensors as in eager mode, and what gets
recorded is only the raw batched torch program it emits (the same operations a hand-written
surrogate would run, plus storch's grad-mode switches and ``detach``es). A function storch runs per
plate entry with ``torch.func.vmap`` (the vmap treatment: ``flip``, ``gather``, ``scatter``,
``Categorical.log_prob``) is recorded as the batched operations vmap runs (a pre-dispatch trace sees
vmap's wrappers only, so storch traces that call below dispatch and replays it in the trace:
storch.plates.rules.vmap; a non-torch function that storch vmaps is refused there, since a grad-mode
switch or custom autograd.Function inside it would be lost). That program is handed
to ``torch.compile(fullgraph=True)``: one graph, no breaks. Later calls with the same signature
replay the compiled program and never enter storch's Python.

An estimator whose eager code picks a path by values (is every value possible? did the i.i.d.
draws find k distinct values?) takes a value-independent path while traced
(``storch.extending.is_tracing``), with the same distribution, and the replayed program checks
what that path assumes at every call (``storch.extending.assume``: an error that says to run the
step eagerly, never a silently wrong sample). So ``unordered_set`` on one node compiles: it samples
by stochastic beam search and computes its set probabilities in log space, and from the same seed
draws other samples than the eager step (:meth:`CompiledStep.eager` runs the traced paths eagerly).
Over sequences (a partition) its beam step assumes every child of the beam possible, checked at
every call; with ``eos=`` (finished sequences make impossible children) it is refused. The one-step
``sum_and_sample`` compiles the same way: traced, it sums
as many values and draws as many samples as eager code does when the support is large enough (k'
possible values in some entry, and a value outside them), always draws the rejection sampler's
replacement, and assumes that every value of every variable is possible beyond its budget; each
assumption is checked at every call. With ``buffer=`` (sequences) its memory is state: refused.

With ``backend=None`` nothing is compiled: later calls run the traced program as recorded (an FX
graph of the plain torch calls, in Python). That is the eager cost of the same step written by
hand, without storch's per-call dispatch and bookkeeping and without a compiler's first-call time
(a trace takes about a second); the limits below are the same. Where a compiler backend fails on the traced
program (dynamo, AOT autograd, inductor, a custom backend: an exception of ``torch._dynamo`` or ``torch._inductor``
at a trace's first call), the error is storch's: it names the step and the backend, gives torch's exceptions
down the chain (the RuntimeError dynamo's "Attempt to trace generator" hid as a suppressed context among them)
and says to use ``backend=None``, another backend, or the eager step (``refusals._compiler_failure``).

What a trace fixes, and what a step may not do (each raises a clear error where it can be seen):

- the step returns tensors (e.g. ``storch.surrogate_loss()``), not plate tensors, and does not call
  ``storch.backward()``: call ``loss.backward()`` on the result;
- the step does not step the optimizer or touch gradients: a ``torch.optim`` optimizer's ``step()`` and
  ``zero_grad()`` and any read or write of a tensor's ``.grad`` (``model.zero_grad()``, ``p.grad = None``,
  ``clip_grad_norm_``) are refused (:class:`_TraceMode`, before anything changes): a trace records the torch program only, so a
  replayed call would never update or zero the gradients (``opt.step()`` at the start of the step trained
  nothing, silently). Step outside: ``loss = f(x); loss.backward(); opt.step(); opt.zero_grad()``;
- an estimator with state (``has_update`` or ``state_tensors``) made anew at every call of the step is refused
  (created again in the replay check's eager run, the step's second call: :func:`storch.estimators.construction.creation_mark`):
  eagerly it starts from scratch at every call, the replay would keep the traced instance; create it once, outside
  the step (one created at the first call and kept, ``if self.est is None: self.est = ...``, is fine);
- estimators that update their own state (``has_update``) are refused unless the update can be
  replayed (``replays_update``: score's moving-average and learned (NVIL) baselines,
  gumbel_softmax's and gumbel_straight_through's temperature schedule; learned control variates
  (relax, rebar, lax) with ``backend=None`` only; a user's trainable baseline module and
  sum_and_sample's buffer of sequences are refused), see below;
- no custom ``torch.autograd.Function`` on the path to the step's outputs (a user's, or the ``_Dirichlet`` of torch's
  Dirichlet and Beta ``rsample``): the trace records its forward's operations, not its backward (refused at the
  trace: :func:`storch.compiled.checks._check_custom_functions`); draw a Dirichlet as normalised Gammas; a
  ``torch.library.custom_op`` with ``register_autograd`` is recorded as the op and keeps its backward;
- tensors the step reads but does not receive as arguments are captured: ``nn.Parameter``s by
  reference (gradients and optimizer updates work as usual); any other captured tensor that
  requires grad is refused (pass it as an argument); other captured tensors are read live (same
  object). A parameter, buffer, tensor or module that the step reached by name and that is replaced later
  (``model.load_state_dict(sd, assign=True)``, ``model.enc = nn.Linear(...)``, ``holder["dec"] = ...``, a
  global or ``nonlocal`` name rebound) is seen at the next call, which traces again (:func:`_guard`: a dict
  lookup or attribute read per link on the way: a global name, a closure cell, an entry of a dict or list
  these hold, an attribute of a module, from its closure, globals, bound ``self``, defaults and module
  arguments: ``guards._reached``); one reached otherwise (an attribute of a plain object) is not: call
  :meth:`CompiledStep.clear`. The captured tensors' ``requires_grad`` is checked at
  each call (a parameter unfrozen after a first call made while frozen: traced again, since storch decided
  in Python whether the loss updates estimators and refuses a second differentiation); the ``requires_grad``
  of the reached modules' parameters is part of the key (:meth:`CompiledStep._python_state`), so alternating
  freezes (a GAN) trace each state once. With the default
  backend (inductor, compiled without dynamo's guards) their dtype, device and shape and the autocast state
  are checked as well (``model.double()``: traced again);
- in-place updates of captured buffers and of arguments (BatchNorm's running statistics, a counter,
  ``x.sub_(0.5)``) happen once per call, as eagerly: the trace and the replay check run the step on the
  real tensors, so what they wrote is saved first and put back after each (a refused call changes nothing);
- Python values the step reads (global options, Python numbers, plain objects' attributes) are fixed at
  trace time; call :meth:`CompiledStep.clear` after changing them. Two are watched and key the trace
  (:meth:`CompiledStep._python_state`): the ``training`` flags of the modules the step reaches (``model.eval()``)
  and the values last set of each estimator's options (``est.temperature = 0.1``). A non-tensor argument is traced once per
  value (a step traced ``_RETRACE_WARNING`` times warns: pass a changing number as a 0-dim tensor), and
  tensors the step stores outside itself (a metrics dict) keep the traced call's values;
- data-dependent Python control flow (``if tensor.item() > 0``) cannot be traced: the error says so; so
  are Python reads of a traced tensor's values (``.tolist()``, ``.numpy()``, ``np.asarray``: a loop over
  ``range(max(lengths.tolist()))`` would be fixed to the first call's lengths; through its memory too:
  ``__dlpack__``, ``data_ptr``, ``untyped_storage`` / ``storage``, which pickle and ``torch.save`` read, and
  ``copy.deepcopy``: a black-box cost read so reused the first call's costs; ``str()`` is let through for
  printing) and data-dependent shapes
  (a boolean mask ``x[mask]``, ``nonzero``, ``masked_select``, ``unique``: use ``torch.where``), refused
  by a torch function mode active during the trace only (:class:`_TraceMode`);
- a call of a DistributedDataParallel or FSDP module inside the step is refused
  (:func:`_no_data_parallel_in_trace`, a module forward pre-hook during the trace only): DDP's forward arms
  its gradient averaging outside the torch program, so the replay left every rank its own gradient from
  the second call on (aot_eager raised dynamo's error); the message says to call ``ddp.module`` in the
  step and average the gradients after ``loss.backward()``;
- a gradient hook registered inside the step (``register_hook``, ``register_post_accumulate_grad_hook``, on any
  tensor: :class:`_TraceMode`, storch's own hooks aside) and a call of a module with a backward hook (full, pre or
  the deprecated kind, its own or global: :func:`_no_data_parallel_in_trace`) are refused: the program records no
  hook, so the replay skipped a module's backward hook silently, and a hook on a parameter or argument would be
  registered at the trace only. The message says to register a hook on a parameter or input once, outside the
  step, or to run the step eagerly; forward hooks are traced as the rest of the module, and a hook added
  or removed on a module the trace called (or a global one) later traces again (:func:`guards._guard`);
- a ``torch.inference_mode()`` block inside the step is refused (:class:`_TraceMode`): it is no torch function, so
  the program does not record it and the replayed calls differentiated what it computed; ``torch.no_grad()`` and
  ``enable_grad`` are recorded as they switch (the trace makes each switch: torch 2.7 and 2.8's ``pre_dispatch``
  trace records it without making it). Calling the compiled step under ``inference_mode`` is fine;
- differentiating inside the step (``torch.autograd.grad`` or ``.backward()`` on what it computed: a
  gradient penalty, a lookahead step) is refused: the backward pass reads tensors autograd saved in
  the forward pass, which a ``pre_dispatch`` trace cannot connect to the program (they would be fixed
  to the first call's values);
- a ``torch.func`` transform opened inside the step (``vmap``, ``jvp``, ``jacfwd``, ``hessian``: :class:`_TraceMode`
  sees a torch call at a deeper functorch level than the step's call) is refused by name: the pre-dispatch trace records
  above functorch, so it baked vmap's batched wrappers into the program as constants cut off from the arguments
  (refused before only as "a tensor ... neither an argument nor an nn.Parameter", or by functorch's "escaped"
  error in the replay check); ``grad``, ``vjp``, ``jacrev`` are refused as a differentiation inside the step.
  ``flex_attention`` (torch.nn.attention), which outside torch.compile calls its ``score_mod`` under vmap, is refused
  by its own name (it never reaches the check of its autograd Function's backward); so
  is forward mode opened in the step without torch.func (``with torch.autograd.forward_ad.dual_level():``, seen as a
  torch call in a dual level the step's call was not in): the trace records ``make_dual`` and ``unpack_dual`` but not
  the level, so the replay check failed with torch's raw "invalid forward AD level" (both backends);
- a compiled step called inside a ``torch.func`` transform (``vmap``, ``grad``, ``jvp`` around it) or a
  ``torch.autograd.forward_ad.dual_level()`` (with inductor a replay dropped the dual argument's tangent) is refused at
  every call, its first and its replays (one C call: the functorch level, None outside every transform): its trace
  would see the transform's wrappers, and its replay check failed with torch's raw "vmap over torch.allclose isn't
  supported yet". Call the uncompiled step under the transform, or differentiate the compiled result with
  ``torch.autograd`` outside it;
- an order-1 surrogate whose eager hooks refuse a second differentiation (an order-1 estimator, a kink
  on a pathwise path: storch.conditions.order_guard) is refused the same way: each call's outputs are hooked
  (so any create_graph pass through them is refused, outside ``estimator_create_graph``);
- with a compiler backend (not ``backend=None``) every output is hooked so: torch's compiled program cannot
  be differentiated twice, and ``torch.autograd.functional.hessian`` of it returned zeros silently. The
  replay (``backend=None``) differentiates to every order (``surrogate_loss(order=2)`` in the step). With
  inductor the hook also refuses a batched backward pass (``jacobian(..., vectorize=True)``,
  ``is_grads_batched=True``, ``torch.func.vmap`` over ``torch.autograd.grad``), whose batched gradients inductor's
  compiled backward failed on with torch's raw "Cannot access data pointer" (``backend=None`` batches it: eager's
  Jacobian);
- on the first call the step also runs eagerly and its trace runs from the same random state; if they
  disagree (the result depends on Python or generator state the trace cannot see: SPSA's coupled
  draws replay the random state) it is refused. A draw with a generator of its own (``generator=g`` of a
  torch call, a ``storch.Graph(generator=g)``) is refused where :class:`_TraceMode` sees it. A draw from Python's
  ``random`` or numpy's global generator is refused by comparing their states around the trace
  (:func:`_check_python_random`: the values may agree by chance).

An estimator whose update can be replayed (``Estimator.replays_update``; ``score`` with
``baseline="moving_average"``) keeps the eager semantics: the baseline of a step is the average
of earlier steps only, and the update runs when the returned loss is backpropagated with
``.backward()`` (``torch.autograd.grad``, a ``no_grad`` call and a second ``retain_graph``
backward update nothing; a non-finite loss raises ``storch.NonFiniteCostError`` there; so does a step
without updates, whose surrogate loss is checked when a backward pass reaches it, as
``storch.backward()`` would: see :func:`_finite_on_backward`). While
the step is traced, ``surrogate_loss`` adds a zero "probe" input of the program to the loss (two
entries: the second in the graph of the loss's gradient, so that the ``.backward()`` of a second-order
objective built from ``autograd.grad(loss, θ, create_graph=True)`` updates too, as eagerly) and
the estimator's ``update_inputs`` (for the moving average: each cost's detached mean) become extra
outputs of the program; every call makes a fresh probe whose gradient accumulation queues the
estimator's ``update_from`` with that call's values (and ``storch.distributed`` averages them over
ranks there, as eagerly). The state its components read (``state_tensors``: the averages) is
passed to the program as inputs at every call, never baked in, so ``load_state_dict`` works; the
cache keeps a trace per structure of that state (the first step, with no average and so no
baseline, is one program; the steps after it another). Such a step builds one surrogate loss with
updates (a second one is refused), and :meth:`CompiledStep.graph_module`'s program then takes
the inputs :meth:`CompiledStep.program_inputs` lists (the arguments, the probe, the state).
An annealed temperature (``gumbel_softmax(temperature=schedule)``) is the simplest case: its update
needs nothing from the step (``update_inputs`` is empty; ``update_from`` advances the step and
evaluates the schedule in Python), and its state is τ at the current step, a 0-dim float64 tensor
that the program reads at every call (one trace for every step; a bad schedule value raises
``storch.OptionError`` at the next call, before the program runs, as it does eagerly where the
estimator samples). With CUDA tensors, eager torch divides by that CPU scalar as by a float and
inductor copies it to the device in the program (not yet run on a GPU).
NVIL's learned baseline (``score(baseline="learned")``, b = c + b_ψ(h)) replays its regression: the
program returns the detached input h of b_ψ (viewed in each cost's frame) and the detached costs,
and ``update_from`` evaluates b_ψ on them and takes its Adam step eagerly (the code an eager step
runs too), then updates the running means c (state tensors); the replayed forward reads ψ live
(parameters are captured by reference). Its networks are built on first use, which a trace cannot
record: run one step eagerly first (or load a state_dict), else the trace is refused with that reason.
Learned control variates (relax, rebar, lax: φ trained on the gradient's variance) differentiate the
loss again (``update_uses_loss_graph``). With ``backend=None`` the replay runs the program's operations
in autograd's graph, so the program returns their ``update_inputs`` (the distribution parameters) with
their graph and the loss, and right after each call ``loss_graph_values`` computes ∂/∂φ Σ ĝ² from them
(for every call with grad on, also one only evaluated with ``torch.autograd.grad``, whose values are
then dropped); ``update_from`` takes the Adam step on ``.backward()``. A compiled program is one
autograd node, so other backends refuse them. Differentiating inside the traced step itself cannot
work (see above), which is why the second differentiation happens outside the program.
An estimator without an update is tracked this way only if it has state when first traced (a
``score(baseline="moving_average", update=False)`` with loaded averages); one whose first
average is loaded after that first trace needs :meth:`CompiledStep.clear`.

Random draws are recorded as torch random operations, so every call draws fresh samples from
torch's generator. During the trace torch's RNG state is saved and restored (the trace's draws do
not shift the first real call's samples), and torch.distributions argument validation is turned
off, as ``torch.compile`` itself does for the whole process on its first compile. Inductor compiles
with ``fallback_random=True`` (torch's generator: the draws eager storch makes for a seed) unless
``options=`` sets it: its own generator gave two normal draws of one shape the same noise.

The modules, each importing only those below it (the ``compiled-layers`` contract in ``.importlinter``):

- ``step``: ``storch.compile`` and :class:`CompiledStep`: the cache of traces, the trace, each call;
- ``checks``: the checks a new trace passes (replayable estimators, captured tensors, Python randomness, the
  replay check: eager and traced runs agree);
- ``updates``: the update a compiled step replays (the recorder, the probe's backward);
- ``state``: estimators' state: its structure keys a trace, its tensors lifted into program inputs;
- ``program``: the traced program: rewritten, compiled (or replayed as recorded: ``backend=None``), run;
- ``trace_mode``: what the trace watches (value reads, data-dependent shapes, in-place writes);
- ``guards``: the per-call check that the program still fits the modules and tensors the step reaches;
- ``finite``: a replayed call's non-finite loss refused on backward;
- ``keys``: a trace's key (the arguments' signature, the Python state it fixes);
- ``refusals``: what a compiled step may not do, and the messages (imports nothing of the package).
"""

from __future__ import annotations

from .step import CompiledStep, compile

__all__ = ["compile", "CompiledStep"]
