"""torch.autograd.grad on plate tensors inside a step: a cost that holds a derivative in the sample (a decoder's
Jacobian penalty at z, found porting a regularised VAE) raised "torch.autograd.grad failed on plate tensors ...
element 0 of tensors does not require grad" (the vmap fallback). It is the per-sample derivative now, from one
backward pass of the raw outputs, where the outputs are on the input's plates; refused where one pass would sum
entries' derivatives."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Normal

import storch


def test_per_entry_derivative_is_the_entrys_own():
    """The oracle of every plate treatment: per entry, what the function gives on that entry alone."""
    torch.manual_seed(0)
    dec = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    with storch.Graph():
        x = storch.denote_independent(torch.randn(6, 3, requires_grad=True), 0, "data")
        z = storch.estimator("reparameterization", plate="z", n_samples=4)(Normal(x, 1.0))
        (g,) = torch.autograd.grad(dec(z).pow(2).sum(), z, create_graph=True)
        assert isinstance(g, storch.PlateTensor) and g.plates == z.plates and g.shape == (3,)
        assert g.tensor.requires_grad  # (create_graph: a cost can be built from it)
        raw = z.tensor.detach()
        for i in range(raw.shape[0]):
            for j in range(raw.shape[1]):
                entry = raw[i, j].clone().requires_grad_()
                (want,) = torch.autograd.grad(dec(entry).pow(2).sum(), entry)
                torch.testing.assert_close(g.tensor[i, j], want)
        storch.reset()


def test_a_cost_of_the_samples_derivative_has_an_unbiased_gradient():
    """cost = |∇_z h(z)|² with h(z) = Σ a z³ / 3 (∇_z h = a z²), z ~ Normal(μ, 1) per coordinate:
    E[cost] = Σ a² E[z⁴] = Σ a² (μ⁴ + 6μ² + 3), so d/dμ = a² (4μ³ + 12μ) and d/da = 2a (μ⁴ + 6μ² + 3). The
    reparameterised estimate, averaged over independent replicates (a data plate), is z-tested against them."""
    torch.manual_seed(1)
    reps = 4000
    mu = torch.tensor([0.3, -0.6], dtype=torch.float64).expand(reps, 2).clone().requires_grad_()
    a = torch.tensor([1.5, -0.5], dtype=torch.float64).expand(reps, 2).clone().requires_grad_()
    with storch.Graph():
        m, aa = storch.denote_independent((mu, a), 0, "rep")
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(m, 1.0))
        (g,) = torch.autograd.grad((aa * z ** 3 / 3).sum(), z, create_graph=True)
        storch.add_cost((g ** 2).sum(), name="jac")
        loss = storch.surrogate_loss()
        g_mu, g_a = torch.autograd.grad(loss, (mu, a))
    m0, a0 = mu[0].detach(), a[0].detach()
    exact = {"mu": a0 ** 2 * (4 * m0 ** 3 + 12 * m0), "a": 2 * a0 * (m0 ** 4 + 6 * m0 ** 2 + 3)}
    for name, got in (("mu", g_mu), ("a", g_a)):
        per_rep = got * reps  # each replicate's own estimate (the data plate's mean divides by reps)
        se = per_rep.std(0) / reps ** 0.5
        assert ((per_rep.mean(0) - exact[name]).abs() < 4 * se).all(), (name, per_rep.mean(0), exact[name], se)


def test_an_output_on_more_plates_than_the_input_is_refused():
    """An output that also carries a later node's plate: each entry of z feeds several entries of it, and one
    backward pass would sum their derivatives."""
    mu = torch.zeros(3, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(mu, 1.0))
        b = storch.estimator("expect", plate="b")(Bernoulli(logits=torch.zeros(3, requires_grad=True)))
        with pytest.raises(storch.PlateError, match=r"plates \('z', 'b'\).*feeds several entries"):
            torch.autograd.grad((z * b).sum(), z)
        storch.reset()


def test_a_parameter_input_of_plate_outputs_is_refused():
    """d(per-sample output)/d(parameter) is one gradient per entry; one backward pass gives their sum."""
    w = torch.ones(3, requires_grad=True)
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(torch.zeros(3, requires_grad=True), 1.0))
        with pytest.raises(storch.PlateError, match=r"not on their plates.*out\.tensor\.sum\(\)"):
            torch.autograd.grad((w * z).sum(), w)
        with pytest.raises(storch.PlateError, match=r"only for a scalar \(per sample\)"):
            torch.autograd.grad(w * z, z)
        storch.reset()


@pytest.mark.parametrize("transform", ["grad", "jacrev"])
def test_a_torch_func_transform_of_a_plate_tensor_points_to_autograd_grad(transform):
    """torch.func.jacrev(dec)(z) wraps z below torch's Python dispatch: the refusal named sparse tensors and
    custom C++ operators only; it names torch.func's transforms and torch.autograd.grad, which works."""
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(torch.zeros(3, requires_grad=True), 1.0))
        f = getattr(torch.func, transform)(lambda t: t.sin().sum())
        with pytest.raises(storch.PlateError, match=r"a torch\.func transform .*torch\.autograd\.grad\(out, z"):
            f(z)
        (g,) = torch.autograd.grad(z.sin().sum(), z)
        torch.testing.assert_close(g.tensor, z.tensor.cos())
        storch.reset()


def test_a_grad_output_must_have_the_outputs_per_sample_shape():
    """As torch on one sample ("Mismatch in shape"): a plain grad_output never spreads into plate dims (review r-29: a
    (3, 2) tensor for a per-sample (2,) output on a data plate of 3 gave each data point its own row)."""
    with storch.Graph():
        x = storch.denote_independent(torch.randn(3, 2), 0, "data")
        z = storch.estimator("reparameterization", plate="z", n_samples=2)(Normal(x.requires_grad_(), 1.0))
        out = z * 2.0
        for g in (torch.ones(3, 2), torch.ones(1), storch.PlateTensor(torch.ones(3, 1), x.plates)):
            with pytest.raises(storch.PlateError, match=r"grad_output of per-sample shape .* for an output of "
                                                        r"per-sample shape \(2,\); they must be equal"):
                torch.autograd.grad(out, z, grad_outputs=g, retain_graph=True)
        with pytest.raises(TypeError, match=r"grad_outputs can be either Tensors or None, but got float"):
            torch.autograd.grad(out, z, grad_outputs=(2.0,), retain_graph=True)  # (as torch says for a tensor)
        # the per-sample shape, plain or per entry, is taken
        w = storch.PlateTensor(torch.arange(6.0).reshape(3, 2), x.plates)  # one per data point
        (g,) = torch.autograd.grad(out, z, grad_outputs=w, retain_graph=True)
        assert g.plates == z.plates and torch.equal(g.tensor, (2 * w.tensor).expand(2, 3, 2))
        (g,) = torch.autograd.grad(out, z, grad_outputs=torch.tensor([1.0, -1.0]))
        assert torch.equal(g.tensor, torch.tensor([2.0, -2.0]).expand(2, 3, 2))


def test_a_sample_without_a_gradient_path_says_how_to_differentiate_in_it():
    """An enumerated (or score-function) node's sample, or a pathwise one of constant parameters, does not require
    grad: torch's "element 0 of tensors does not require grad" reached the user (review r-29). The advised detached
    copy gives each entry its own derivative."""
    with storch.Graph():
        z = storch.estimator("reparameterization", plate="z", n_samples=3)(Normal(torch.zeros(2), 1.0))
        with pytest.raises(storch.PlateError, match=r"does not require grad.*z\.detach\(\)\.requires_grad_\(\)"):
            torch.autograd.grad((z ** 3).sum(), z)
        b = storch.estimator("expect", plate="b")(Bernoulli(logits=torch.zeros(2, requires_grad=True)))
        with pytest.raises(storch.PlateError, match=r"does not require grad"):
            torch.autograd.grad((b ** 3).sum(), b)
        zd = z.detach().requires_grad_()
        (g,) = torch.autograd.grad((zd ** 3 / 3).sum(), zd)
        assert g.plates == z.plates
        torch.testing.assert_close(g.tensor, z.tensor ** 2)
        storch.reset()


def test_refusals_name_the_partition_step_and_the_jacobian_option():
    mu = torch.zeros(2, requires_grad=True)
    with storch.Graph():
        est = storch.estimator("reparameterization", plate="w", n_samples=3)
        z0 = est(Normal(mu, 1.0))
        z1 = est(Normal(z0, 1.0))
        with pytest.raises(storch.PlateError, match=r"output on plates \('w@1',\) with respect to an input on plates "
                                                    r"\('w',\)"):
            torch.autograd.grad((z1 ** 2).sum(), z0)
        with pytest.raises(storch.PlateError, match=r"vectorize=False"):
            torch.autograd.grad(z0 * 2, z0, grad_outputs=torch.ones(4, 2), is_grads_batched=True)
        storch.reset()


def test_jacobian_and_hessian_with_vectorize_false_are_per_entry():
    """docs/plates.md says that torch.autograd.functional.jacobian/hessian work with vectorize=False (one
    torch.autograd.grad per output entry) and the refusal of vectorize=True advises it: per entry, the entry's own
    Jacobian and Hessian (diagonal here: 3 z² and 6 z), on the sample's plates."""
    with storch.Graph():
        x = storch.denote_independent(torch.tensor([[0.3, -0.5], [1.2, 0.1], [-0.7, 0.4]], requires_grad=True), 0,
                                      "data")
        z = storch.estimator("reparameterization", plate="z", n_samples=4)(Normal(x, 1.0))
        jac = torch.autograd.functional.jacobian(lambda t: t ** 3, z, vectorize=False)
        assert isinstance(jac, storch.PlateTensor) and jac.plates == z.plates and jac.shape == (2, 2)
        torch.testing.assert_close(jac.tensor, torch.diag_embed(3 * z.tensor.detach() ** 2))
        hess = torch.autograd.functional.hessian(lambda t: (t ** 3).sum(), z)
        assert isinstance(hess, storch.PlateTensor) and hess.plates == z.plates and hess.shape == (2, 2)
        torch.testing.assert_close(hess.tensor, torch.diag_embed(6 * z.tensor.detach()))
        with pytest.raises(storch.PlateError, match=r"pass vectorize=False there"):
            torch.autograd.functional.jacobian(lambda t: t ** 3, z, vectorize=True)
        storch.reset()
