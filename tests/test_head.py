"""The LAPS head against the official release's golden outputs and the reference loop.

* ``head_*.pt`` fixtures (official code, fp32): sims in train and eval mode, the score mask, and
  gradients wrt the inputs and every head parameter, to a relative error of 1e-5;
* randomized cases against :func:`laps.models.reference.reference_similarity`: in float64 (the
  math must agree to rounding: 1e-9) and in float32 (1e-5), dense and sparse upstream gradients,
  several blocks, with and without [CLS], ``sparse_ratio = 1``; on CUDA too when available;
* bf16 autocast, input validation, and the public API.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import FIXTURES
from helpers.common import rel_err
from laps.evaluation import score_matrix
from laps.losses import contrastive_loss
from laps.models.head import HeadPlan, LAPSHead
from laps.models.reference import reference_similarity

HEAD_FIXTURES = ["head_vit_like.pt", "head_swin_like.pt", "head_vit_b16_shape.pt"]
ZERO_GRAD_PARAM = "aggregation.mlp.3.bias"  # the softmax cancels it: zero in exact arithmetic

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]),
]


def official_to_ours(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official head keys (``aggr_net.scale``, ``aggr_net.weight.{0,1,3}.*``) -> this head's."""
    out = {}
    for key, value in state.items():
        if key == "aggr_net.scale":
            out["aggregation.scale"] = value
        elif key.startswith("aggr_net.weight."):
            out["aggregation.mlp." + key[len("aggr_net.weight."):]] = value
        else:
            raise KeyError(f"unexpected official head key {key!r}")
    return out


def load_fixture(name: str) -> dict:
    path = FIXTURES / name
    if not path.exists():
        pytest.skip(f"fixture {path} not found")
    return torch.load(path, weights_only=True)


def fixture_head(fx: dict, device: str) -> LAPSHead:
    c = fx["config"]
    head = LAPSHead(c["embed_size"], c["num_patches"], c["sparse_ratio"], c["aggr_ratio"], c["has_cls"])
    head.load_state_dict(official_to_ours(fx["state_dict"]))
    return head.to(device)


def run_with_grads(fn, head: LAPSHead, img: torch.Tensor, cap: torch.Tensor, upstream: torch.Tensor):
    """``fn(img, cap) -> (sims, mask)``; returns sims, mask and gradients of ``(sims * upstream).sum()``."""
    img = img.detach().clone().requires_grad_()
    cap = cap.detach().clone().requires_grad_()
    head.zero_grad(set_to_none=True)
    sims, mask = fn(img, cap)
    (sims * upstream.to(sims.dtype)).sum().backward()
    params = {name: p.grad.detach().clone() for name, p in head.named_parameters()}
    return sims.detach(), mask, img.grad, cap.grad, params


# ---------------------------------------------------------------------------- golden fixtures
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", HEAD_FIXTURES)
def test_matches_official_fixture(name: str, device: str) -> None:
    fx = load_fixture(name)
    head = fixture_head(fx, device).train()
    img, cap, lens = (fx[k].to(device) for k in ("img_embs", "cap_embs", "cap_lens"))
    assert (head.num_keep, head.num_aggregated) == (fx["config"]["keep_tokens"], fx["config"]["aggregated_tokens"])

    sims, mask, d_img, d_cap, d_params = run_with_grads(
        lambda i, c: head(i, c, lens), head, img, cap, fx["upstream_grad"].to(device)
    )
    assert rel_err(sims, fx["sims_train"]) <= 1e-5
    assert mask.shape == fx["score_mask"].shape
    assert torch.equal(mask.cpu(), fx["score_mask"])
    assert rel_err(d_img, fx["grad_img_embs"]) <= 1e-5
    assert rel_err(d_cap, fx["grad_cap_embs"]) <= 1e-5
    expected = official_to_ours(fx["grad_params"])
    assert set(expected) == set(d_params)
    for key, grad in expected.items():
        if key == ZERO_GRAD_PARAM:
            assert float(d_params[key].norm()) <= 1e-6, key
        else:
            assert rel_err(d_params[key], grad) <= 1e-5, key

    head.eval()
    with torch.no_grad():
        sims_eval = head(img, cap, lens)
    assert isinstance(sims_eval, torch.Tensor)
    assert rel_err(sims_eval, fx["sims_eval"]) <= 1e-5


@pytest.mark.parametrize("name", HEAD_FIXTURES)
def test_reference_oracle_matches_official_fixture(name: str) -> None:
    fx = load_fixture(name)
    head = fixture_head(fx, "cpu")
    sims, mask, d_img, d_cap, d_params = run_with_grads(
        lambda i, c: reference_similarity(head, i, c, fx["cap_lens"], return_mask=True),
        head, fx["img_embs"], fx["cap_embs"], fx["upstream_grad"],
    )
    assert rel_err(sims, fx["sims_train"]) <= 1e-5
    assert torch.equal(mask, fx["score_mask"])
    assert rel_err(d_img, fx["grad_img_embs"]) <= 1e-5
    assert rel_err(d_cap, fx["grad_cap_embs"]) <= 1e-5
    for key, grad in official_to_ours(fx["grad_params"]).items():
        if key != ZERO_GRAD_PARAM:
            assert rel_err(d_params[key], grad) <= 1e-5, key


# ---------------------------------------------------------------------------- randomized cases
# (embed, patches, cls, sparse, aggr, images, captions, caption tensor length, chunk_pairs)
CASES = {
    "vit-like": (48, 36, True, 0.5, 0.4, 7, 9, 13, 11),
    "swin-like": (40, 49, False, 0.8, 0.6, 5, 8, 10, 7),
    "keep-all": (24, 16, True, 1.0, 0.5, 6, 5, 9, 4),  # nothing dropped: the fusion token is zero
    "keep-all-no-cls": (32, 25, False, 1.0, 0.3, 4, 6, 7, 1),
    "odd": (20, 30, True, 0.37, 0.9, 9, 4, 6, 5),
    "one-pair": (16, 9, True, 0.6, 0.7, 1, 1, 5, 2048),
    "vit-b16": (32, 196, True, 0.5, 0.4, 4, 6, 12, 2048),
    "many-captions": (16, 9, True, 0.6, 0.7, 3, 40, 6, 2048),
}


def random_case(case: str, dtype: torch.dtype, device: str, seed: int = 0):
    dim, n_patch, has_cls, sparse, aggr, n_img, n_cap, length, chunk = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the head's initial parameters
    head = LAPSHead(dim, n_patch, sparse, aggr, has_cls, chunk_pairs=chunk)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    img = torch.randn(n_img, n_patch + int(has_cls), dim, generator=gen)
    cap = torch.randn(n_cap, length, dim, generator=gen)
    lens = torch.randint(1, length + 1, (n_cap,), generator=gen)
    lens[0] = length
    if n_cap > 2:
        lens[1] = 1  # a caption of a single token
    head = head.to(device=device, dtype=dtype)
    return head, img.to(device, dtype), cap.to(device, dtype), lens.to(device)


def upstream_grad(shape: tuple[int, int], kind: str, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "sparse":  # few pairs with a gradient, as with hardest negatives
        grad = grad * (torch.rand(shape, generator=gen) < 0.15)
        grad[0, 0] = 1.0
    return grad


def compare_to_reference(head, img, cap, lens, grad, tol: float, param_tol: dict[str, float]) -> None:
    device = img.device
    ours = run_with_grads(lambda i, c: head.similarity(i, c, lens, return_mask=True), head, img, cap, grad.to(device))
    ref = run_with_grads(
        lambda i, c: reference_similarity(head, i, c, lens, return_mask=True), head, img, cap, grad.to(device)
    )
    assert rel_err(ours[0], ref[0]) <= tol
    assert torch.equal(ours[1].transpose(0, 1).cpu(), ref[1].cpu().to(ours[1].dtype))
    assert rel_err(ours[2], ref[2]) <= tol
    assert rel_err(ours[3], ref[3]) <= tol
    scale = max(1.0, float(ref[4]["aggregation.mlp.3.weight"].norm()))
    for key, g in ref[4].items():
        if key == ZERO_GRAD_PARAM:
            assert float(ours[4][key].norm()) <= param_tol.get(key, tol) * scale, key
        else:
            assert rel_err(ours[4][key], g) <= param_tol.get(key, tol), key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_random_float64_matches_reference(case: str, kind: str, device: str) -> None:
    """In float64 the vectorised head and the loop agree to rounding: same math, both backward paths."""
    head, img, cap, lens = random_case(case, torch.float64, device)
    grad = upstream_grad((img.shape[0], cap.shape[0]), kind)
    compare_to_reference(head, img, cap, lens, grad, 1e-9, {})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_random_float32_matches_reference(case: str, device: str) -> None:
    """fp32 to 1e-5. The scale's gradient is a sum of thousands of terms of both signs, often ~100 times
    smaller than their magnitudes: rounding differences of 1e-7 in each term (from any change of the
    order of operations, in either implementation) move it by about 1e-3, hence its looser bound.
    The float64 test above pins it to 1e-9."""
    head, img, cap, lens = random_case(case, torch.float32, device, seed=3)
    grad = upstream_grad((img.shape[0], cap.shape[0]), "dense", seed=4)
    compare_to_reference(head, img, cap, lens, grad, 1e-5, {"aggregation.scale": 5e-3, ZERO_GRAD_PARAM: 1e-6})


@pytest.mark.parametrize("group", [1, 3, 16])
def test_fusion_dots_in_caption_groups(group: int) -> None:
    """The fusion row's word dots, computed a group of captions at a time (GPU blocks hold many)."""
    from laps.models.head.kernels import fusion_dots

    gen = torch.Generator().manual_seed(0)
    fuse, dots = torch.rand(3, 8, 5, generator=gen, dtype=torch.float64), torch.randn(3, 6, 8, 4, generator=gen,
                                                                                          dtype=torch.float64)
    expected = torch.einsum("vtk,vktl->vtl", fuse, dots[:, 1:])
    assert torch.allclose(fusion_dots(fuse, dots[:, 1:], group=group), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["dense", "sparse"])
def test_gpu_block_plan_matches_reference(kind: str) -> None:
    """The CUDA plan (all captions of the budget in one block: here 40, so the fusion GEMM runs in
    caption groups; torch's kernels), on CPU tensors: the same numbers as the loop, forward and backward."""
    planned: list[list[tuple[int, int, int, int]]] = []

    class RecordingPlan(HeadPlan):
        def blocks(self, n_img: int, n_cap: int, block_pairs: int) -> list[tuple[int, int, int, int]]:
            planned.append(super().blocks(n_img, n_cap, block_pairs))
            return planned[-1]

    head, img, cap, lens = random_case("many-captions", torch.float64, "cpu")
    head.plan = RecordingPlan(**vars(HeadPlan.for_device("cuda")))
    everything = [(0, img.shape[0], 0, cap.shape[0])]
    assert HeadPlan.for_device("cpu").blocks(img.shape[0], cap.shape[0], head.chunk_pairs) != everything  # the control
    compare_to_reference(head, img, cap, lens, upstream_grad((img.shape[0], cap.shape[0]), kind), 1e-9, {})
    assert planned and all(p == everything for p in planned)  # the head planned with its plan: one block


@pytest.mark.parametrize(
    ("kind", "settings"),
    [
        ("dense", {}),
        ("sparse", {}),
        ("image-range-without-gradient", {}),
        ("dense", {"chunk_pairs": 16}),  # image ranges of two images
        ("dense", {"max_saved_mb": 0.0}),  # blocks and the norms' products recomputed in backward
    ],
)
def test_split_gathers_and_image_chunks_match_reference(kind: str, settings: dict) -> None:
    """Backward with every block's word-token gradients in products of their own (a gather budget of
    one byte: an image range's token gradient is written by its first block, added to by the next),
    the norms three images at a time (as on a GPU) and image ranges whose pairs carry no gradient
    (their blocks are skipped; their tokens' gradient is zero)."""
    head, img, cap, lens = random_case("vit-like", torch.float64, "cpu")  # blocks of one image, 5 or 4 captions
    # every caption in one run of the norms: an image's rows take n_cap (M + 1) N float64s
    image_rows = cap.shape[0] * (head.num_aggregated + 1) * head.num_patches * 8
    head.plan = HeadPlan.for_device("cpu").replace(gather_bytes=1, image_bytes=3 * image_rows)
    assert head.plan.image_step(image_rows) == 3
    for name, value in settings.items():
        setattr(head, name, value)
    grad = upstream_grad((img.shape[0], cap.shape[0]), "sparse" if kind == "sparse" else "dense")
    if kind == "image-range-without-gradient":
        grad[2:4] = 0.0  # still the dense path: five of seven images carry a gradient
    compare_to_reference(head, img, cap, lens, grad, 1e-9, {})


def test_image_tokens_without_gradient() -> None:
    """Image features without a gradient (a frozen encoder): the head's parameters and the words
    still get theirs, the same as the loop's."""
    head, img, cap, lens = random_case("vit-like", torch.float64, "cpu")
    grad = upstream_grad((img.shape[0], cap.shape[0]), "dense")
    results = []
    for fn in (lambda c: head.similarity(img, c, lens)[0], lambda c: reference_similarity(head, img, c, lens)):
        c = cap.clone().requires_grad_()
        head.zero_grad(set_to_none=True)
        (fn(c) * grad).sum().backward()
        results.append((c.grad, {k: p.grad.clone() for k, p in head.named_parameters()}))
    (oc, op), (rc, rp) = results
    assert rel_err(oc, rc) <= 1e-9
    for key in rp:
        if key != ZERO_GRAD_PARAM:
            assert rel_err(op[key], rp[key]) <= 1e-9, key


def test_prepared_gram_with_a_graph_is_refused() -> None:
    """``gram`` and ``cls_norm`` get their gradients through the tokens: one that carries a graph of
    its own would lose it silently, so it is refused."""
    head, img, cap, lens = random_case("vit-like", torch.float32, "cpu")
    image = head.prepare_images(img.requires_grad_())
    image = image._replace(gram=image.gram.clone().requires_grad_())
    with pytest.raises(ValueError, match="no graph"):
        head.score_prepared(image, head.prepare_captions(cap, lens))


@pytest.mark.parametrize("max_saved_mb", [0.0, 0.01, 1024.0])
def test_recomputed_and_kept_blocks_agree(max_saved_mb: float) -> None:
    """Blocks kept from forward to backward and blocks recomputed in backward give the same gradients."""
    head, img, cap, lens = random_case("vit-like", torch.float64, "cpu")
    head.max_saved_mb = max_saved_mb
    compare_to_reference(head, img, cap, lens, upstream_grad((img.shape[0], cap.shape[0]), "dense"), 1e-9, {})


def test_hardest_negative_loss_gradients_match_reference() -> None:
    """The official loss (hardest negatives) gives gradients to few pairs: the sparse backward path."""
    head, img, cap, lens = random_case("vit-b16", torch.float64, "cpu")
    n = min(img.shape[0], cap.shape[0])
    results = []
    for fn in (lambda i, c: head.similarity(i, c, lens)[0], lambda i, c: reference_similarity(head, i, c, lens)):
        i, c = img.clone().requires_grad_(), cap.clone().requires_grad_()
        head.zero_grad(set_to_none=True)
        contrastive_loss(fn(i, c)[:n, :n], torch.arange(n), 0.2, max_violation=True).backward()
        results.append((i.grad, c.grad, {k: p.grad.clone() for k, p in head.named_parameters()}))
    (oi, oc, op), (ri, rc, rp) = results
    assert rel_err(oi, ri) <= 1e-9 and rel_err(oc, rc) <= 1e-9
    for key in rp:
        if key != ZERO_GRAD_PARAM:
            assert rel_err(op[key], rp[key]) <= 1e-9, key


def test_backward_twice_with_retained_graph() -> None:
    """Kept intermediates survive a first backward: a second one (retain_graph) gives the same gradients."""
    head, img, cap, lens = random_case("vit-like", torch.float64, "cpu")
    img.requires_grad_()
    sims, _ = head.similarity(img, cap, lens)
    grad = upstream_grad(tuple(sims.shape), "dense").to(sims.dtype)
    (first,) = torch.autograd.grad(sims, img, grad, retain_graph=True)
    (second,) = torch.autograd.grad(sims, img, grad)
    assert torch.equal(first, second)


def test_padding_words_do_not_matter() -> None:
    """Tokens past a caption's length change nothing, in value or gradient of the valid ones."""
    head, img, cap, lens = random_case("odd", torch.float64, "cpu")
    noisy = cap.clone()
    for t, n in enumerate(lens.tolist()):
        noisy[t, n:] = 1e3 * torch.randn_like(noisy[t, n:])
    grad = upstream_grad((img.shape[0], cap.shape[0]), "dense")
    a, _, d_img_a, d_cap_a, d_par_a = run_with_grads(lambda i, c: head.similarity(i, c, lens), head, img, cap, grad)
    b, _, d_img_b, d_cap_b, d_par_b = run_with_grads(lambda i, c: head.similarity(i, c, lens), head, img, noisy, grad)
    assert rel_err(b, a) <= 1e-12
    assert rel_err(d_img_b, d_img_a) <= 1e-12
    for t, n in enumerate(lens.tolist()):
        assert rel_err(d_cap_b[t, :n], d_cap_a[t, :n]) <= 1e-12
        assert not d_cap_b[t, n:].any()  # padding gets no gradient
    for name, g in d_par_a.items():
        assert (d_par_b[name] - g).norm() <= 1e-12 * max(1.0, float(g.norm())), name


def test_large_logits_stay_finite() -> None:
    """A very sharp aggregation softmax (huge scale) gives finite scores and gradients, and the
    scoring path without gradients (evaluation) gives the same scores."""
    head, img, cap, lens = random_case("vit-like", torch.float32, "cpu")
    with torch.no_grad():
        head.aggregation.scale.fill_(1e4)
        scored = head.similarity(img, cap, lens)[0]
    img.requires_grad_()
    sims, _ = head.similarity(img, cap, lens)
    sims.sum().backward()
    assert torch.isfinite(sims).all() and torch.isfinite(img.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    assert rel_err(scored, sims) <= 1e-5


# ---------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_close_to_fp32(device: str) -> None:
    head, img, cap, lens = random_case("vit-b16", torch.float32, device, seed=5)
    head.eval()
    with torch.no_grad():
        ref = head(img, cap, lens)
        with torch.autocast(device, dtype=torch.bfloat16):
            low = head(img, cap, lens)
            low_bf16_inputs = head(img.bfloat16(), cap.bfloat16(), lens)
    assert low.dtype == torch.float32
    assert rel_err(low, ref) <= 1e-2
    assert rel_err(low_bf16_inputs, ref) <= 1e-2


def test_bf16_autocast_backward_runs() -> None:
    head, img, cap, lens = random_case("swin-like", torch.float32, "cpu", seed=6)
    img.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sims, mask = head.train()(img, cap, lens)
    sims.sum().backward()
    ref = run_with_grads(lambda i, c: head.similarity(i, c, lens), head, img, cap, torch.ones(sims.shape))
    # bf16 keeps 8 mantissa bits, and a max over words or rows can pick another argmax than in
    # fp32, which moves that gradient wholesale: the bound is loose (the similarities themselves
    # are held to 1e-2 in the eval test above).
    assert torch.isfinite(img.grad).all()
    assert rel_err(img.grad, ref[2]) <= 0.25
    assert mask.dtype == torch.float32


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"sparse_ratio": 0.0}, "sparse_ratio"),
        ({"sparse_ratio": 1.5}, "sparse_ratio"),
        ({"sparse_ratio": -0.2}, "sparse_ratio"),
        ({"aggr_ratio": 0.0}, "aggr_ratio"),
        ({"aggr_ratio": 1.01}, "aggr_ratio"),
        ({"aggr_ratio": float("nan")}, "aggr_ratio"),
    ],
)
def test_ratio_out_of_range_names_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        LAPSHead(32, 49, **kwargs)


def test_ratio_pair_without_aggregated_token() -> None:
    with pytest.raises(ValueError, match="sparse_ratio.*aggr_ratio.*no aggregated token"):
        LAPSHead(32, 9, sparse_ratio=0.5, aggr_ratio=0.2)  # int(9 * 0.2 * 0.5) = 0


@pytest.mark.parametrize("bad", [[6, 4, 3], [0, 4, 3], [3, -1, 2], [1, 2]])  # the last: one length missing
def test_bad_cap_lens(bad: list[int]) -> None:
    head = LAPSHead(8, 4, 0.5, 0.5)
    with pytest.raises(ValueError, match="cap_lens"):
        head.similarity(torch.randn(2, 5, 8), torch.randn(3, 5, 8), torch.tensor(bad))


@pytest.mark.parametrize(("img_dim", "cap_dim"), [(8, 6), (6, 8), (6, 6)])
def test_embedding_sizes_disagree(img_dim: int, cap_dim: int) -> None:
    head = LAPSHead(8, 4, 0.5, 0.5)
    with pytest.raises(ValueError, match="embedding sizes disagree"):
        head.similarity(torch.randn(2, 5, img_dim), torch.randn(3, 5, cap_dim), torch.tensor([5, 4, 3]))


def test_wrong_token_count() -> None:
    head = LAPSHead(8, 4, 0.5, 0.5, has_cls=True)
    with pytest.raises(ValueError, match="num_patches"):
        head.similarity(torch.randn(2, 4, 8), torch.randn(3, 5, 8), torch.tensor([5, 4, 3]))


@pytest.mark.parametrize(("kwargs", "name"), [({"chunk_pairs": 0}, "chunk_pairs"), ({"max_saved_mb": -1}, "max_saved_mb"),
                                               ({"embed_dim": 0}, "embed_dim")])
def test_bad_sizes(kwargs: dict, name: str) -> None:
    args = {"embed_dim": 8, "num_patches": 16, **kwargs}
    with pytest.raises(ValueError, match=name):
        LAPSHead(**args)


# ---------------------------------------------------------------------------- API
def test_public_api_and_shapes() -> None:
    head, img, cap, lens = random_case("swin-like", torch.float32, "cpu")
    assert head.num_patches == 49 and not head.has_cls
    assert head.num_keep == 40 and head.num_aggregated == 23
    assert isinstance(head.aggregation.mlp, torch.nn.Sequential)
    assert head.aggregation.scale.shape == (1, 1, 1)
    sims, mask = head.train()(img, cap, lens)
    assert sims.shape == (img.shape[0], cap.shape[0]) and sims.dtype == torch.float32
    assert mask.shape == (cap.shape[0], img.shape[0], 49)
    assert torch.all(mask.sum(-1) == head.num_keep)
    sims_eval = head.eval()(img, cap, lens)
    assert torch.allclose(sims_eval, sims.detach())
    with torch.no_grad():
        prepared = head.score_prepared(head.prepare_images(img), head.prepare_captions(cap, lens))
        only_sims, no_mask = head.similarity(img, cap, lens)
        blocks = score_matrix(head, img, cap, lens, image_block=2, progress=False)
    assert no_mask is None
    assert torch.allclose(prepared[0], sims_eval) and torch.allclose(only_sims, sims_eval)
    assert torch.allclose(blocks, sims_eval, rtol=1e-6, atol=1e-7)


def test_empty_batches() -> None:
    head = LAPSHead(8, 4, 0.5, 0.5)
    sims, mask = head.similarity(torch.randn(0, 5, 8), torch.randn(3, 5, 8), torch.tensor([5, 4, 3]), return_mask=True)
    assert sims.shape == (0, 3) and mask.shape == (0, 3, 4)
    sims, _ = head.similarity(torch.randn(2, 5, 8), torch.randn(0, 5, 8), torch.zeros(0, dtype=torch.long))
    assert sims.shape == (2, 0)


def test_state_dict_round_trip_keeps_scores() -> None:
    head, img, cap, lens = random_case("odd", torch.float32, "cpu")
    clone = LAPSHead(head.embed_dim, head.num_patches, head.sparse_ratio, head.aggr_ratio, head.has_cls,
                     chunk_pairs=head.chunk_pairs)
    clone.load_state_dict(copy.deepcopy(head.state_dict()))
    with torch.no_grad():
        assert torch.equal(head.eval()(img, cap, lens), clone.eval()(img, cap, lens))


def test_feedback_records_whether_few_pairs_carried_a_gradient() -> None:
    """``head.feedback.sparse`` is the explicit state one backward leaves for the next forward:
    set after a backward with few nonzero pair gradients, cleared after a dense one."""
    head, img, cap, lens = random_case("vit-like", torch.float64, "cpu")
    assert head.feedback.sparse is False
    for kind, expected in (("sparse", True), ("dense", False), ("sparse", True)):
        sims, _ = head.similarity(img.clone().requires_grad_(), cap, lens)
        (sims * upstream_grad(tuple(sims.shape), kind)).sum().backward()
        assert head.feedback.sparse is expected, kind


@pytest.mark.parametrize(("change", "key"), [({"block_bytes": 0}, "block_bytes"), ({"block_captions": 0}, "block_captions"),
                                             ({"gemm": "mkl"}, "gemm"), ({"image_bytes": -1}, "image_bytes")])
def test_plan_refuses_unusable_values_naming_the_field(change: dict, key: str) -> None:
    with pytest.raises(ValueError, match=f"HeadPlan.{key}"):
        HeadPlan.for_device("cpu").replace(**change)


def test_plan_for_the_device_unless_the_head_has_its_own() -> None:
    head = LAPSHead(16, 9, 0.6, 0.7)
    assert head.plan_for("cpu") == HeadPlan.for_device("cpu") != HeadPlan.for_device("cuda")
    assert head.plan_for("cuda").block_captions is None and HeadPlan.for_device("cpu").block_captions == 8
    head.plan = HeadPlan.for_device("cuda")
    assert head.plan_for("cpu") is head.plan


@pytest.mark.parametrize("kind", ["dense", "sparse"])
@pytest.mark.parametrize("case", ["vit-like", "swin-like", "vit-b16", "many-captions"])
def test_gpu_plan_gives_the_cpu_plans_numbers(case: str, kind: str) -> None:
    """The CUDA plan (other blocks, torch's kernels) on real CPU tensors: fp32 similarities and
    gradients within 1e-5 of the CPU plan's, the same kept patches."""
    head, img, cap, lens = random_case(case, torch.float32, "cpu", seed=7)
    head.chunk_pairs = None  # blocks sized by each plan's own budget
    grad = upstream_grad((img.shape[0], cap.shape[0]), kind, seed=8)
    results = {}
    for device_type in ("cpu", "cuda"):
        head.plan = HeadPlan.for_device(device_type)
        head.feedback.sparse = False
        results[device_type] = run_with_grads(lambda i, c: head.similarity(i, c, lens, return_mask=True),
                                              head, img, cap, grad)
    (s_cpu, m_cpu, i_cpu, c_cpu, p_cpu), (s_gpu, m_gpu, i_gpu, c_gpu, p_gpu) = results["cpu"], results["cuda"]
    assert torch.equal(m_cpu, m_gpu)
    for ours, ref in [(s_gpu, s_cpu), (i_gpu, i_cpu), (c_gpu, c_cpu)]:
        assert rel_err(ours, ref) <= 1e-5
    for name, ref in p_cpu.items():
        # an absolute floor where a gradient vanishes analytically (rounding on both sides)
        assert float((p_gpu[name] - ref).abs().max()) <= 1e-5 * float(ref.abs().max()) + 1e-6, name


@pytest.mark.parametrize("grad_mode", ["dense", "sparse"])
def test_one_aggregated_token_trains(grad_mode: str) -> None:
    """``M = 1`` (small ratios of few patches): the transposed weights are a view of the weights, and
    must still carry no graph; forward and backward match the loop."""
    torch.manual_seed(0)
    head = LAPSHead(16, 16, 0.4, 0.3, True).double()  # int(16 * 0.3 * 0.4) = 1
    assert head.num_aggregated == 1
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(3, 17, 16, generator=gen, dtype=torch.float64)
    cap = torch.randn(4, 6, 16, generator=gen, dtype=torch.float64)
    lens = torch.tensor([6, 3, 4, 5])
    compare_to_reference(head, img, cap, lens, upstream_grad((3, 4), grad_mode), 1e-9, {})
