"""The label-free methods that followed CFR (Orth-Cali, RoboShot, TIE*, FairerCLIP, PPA) and AFR's second stage:
each against a case computed by hand or against its authors' formula written out densely."""

import json
import math
import random

import numpy as np
import pytest
import torch

from calib.clip.features import FeatureSet, SplitFeatures
from calib.clip.prompts import PromptBank
from calib.data import prompt_files
from calib.methods import create, describe_methods, method_mark, run_method
from calib.methods.fairerclip import KernelMap, RandomFourier, config_for, median_sigma, signed_onehot, subsample
from calib.methods.ppa import aggregate_groups, fit_adjusted_linear, null_space_projection
from calib.methods.prompted import concept_basis, orth_cali_matrix, roboshot_embed, tie_scales, tie_translate
from calib.methods.reweighting import afr_split, afr_step, afr_weights
from tests.fixtures import synthetic_prompt_bank

E = np.eye(3)


def _bank(vectors: dict[str, np.ndarray], **sections) -> PromptBank:
    spec = {"dataset": "hand", "class_names": ["c0", "c1"], "attr_names": ["a0", "a1"], **sections}
    texts = sorted(vectors)
    return PromptBank(spec, texts, np.stack([vectors[t] for t in texts]).astype(np.float32))


def _features(z_test: np.ndarray, bank: PromptBank, z_train: np.ndarray | None = None) -> FeatureSet:
    def split(z):
        return SplitFeatures(z=np.asarray(z, np.float32), y=np.arange(len(z)) % 2, g=np.arange(len(z)) % 2)

    train = split(z_train if z_train is not None else z_test)
    return FeatureSet(
        splits={"train": train, "test": split(z_test)},
        text=np.eye(2, 3, dtype=np.float32),
        logit_scale=100.0,
        n_groups=2,
        class_names=["c0", "c1"],
        group_names=["g0", "g1"],
        prompts=bank,
    )


# ------------------------------------------------------------------------------------------- Orth-Cali


def test_orth_cali_matrix_by_hand():
    # spurious prompt e3: P0 = I - e3 e3^T; candidates e1, e2 paired: M = (e1-e2)(e1-e2)^T
    # lam = 1: (M + I)^-1 = [[2,1,0],[1,2,0],[0,0,3]] / 3, so P = P0 (M + I)^-1 = [[2,1,0],[1,2,0],[0,0,0]] / 3
    P = orth_cali_matrix(E[2:3], E[:2], [[0, 1]], lam=1.0)
    np.testing.assert_allclose(P, np.array([[2, 1, 0], [1, 2, 0], [0, 0, 0]]) / 3, atol=1e-12)
    np.testing.assert_allclose(orth_cali_matrix(E[2:3], E[:2], [[0, 1]], lam=0.0), np.diag([1.0, 1.0, 0.0]), atol=1e-12)


def test_orth_cali_and_projection_only_on_class_prompts_by_hand():
    bank = _bank(
        {
            "t0": np.array([1.0, 0, 1]),
            "t1": np.array([0, 0, -3.0]),
            "s": np.array([0, 0, 2.0]),
            "k0": np.array([5.0, 0, 0]),
            "k1": np.array([0, 0.5, 0]),
        },
        orth_cali={
            "source": "t",
            "class_prompts": ["t0", "t1"],
            "spurious_prompts": ["s"],
            "candidate_prompts": ["k0", "k1"],
            "candidate_pairs": [[0, 1]],
        },
    )
    data = _features(np.array([[2.0, 1, 0], [0, 1, 5]]), bank)
    cali = create("orth_cali", lam=1.0)
    cali.fit(data, 0)
    # t0 = (1,0,1)/sqrt2 -> P t0 = (2,1,0)/(3 sqrt2) -> (2,1,0)/sqrt5; t1 = -e3 -> P t1 = 0 (cosine 0 by convention)
    np.testing.assert_allclose(cali.classes[0], np.array([2, 1, 0]) / math.sqrt(5), atol=1e-9)
    proj = create("orth_cali", calibrate=False)
    proj.fit(data, 0)
    np.testing.assert_allclose(proj.classes[0], E[0], atol=1e-9)  # P0 t0 = (1,0,0)/sqrt2
    assert type(proj).row_label({"calibrate": False}) == "orth_cali (projection only)"


# ------------------------------------------------------------------------------------------- RoboShot


def test_roboshot_rejects_then_boosts_by_hand():
    # reject pair (1,1,0) - (1,0,0) = e2; accept pair (0,0,3) - (0,0,1) = 2 e3
    reject = concept_basis(np.array([[[1.0, 1, 0], [1, 0, 0]]]))
    accept = concept_basis(np.array([[[0.0, 0, 3], [0, 0, 1]]]))
    np.testing.assert_allclose(np.abs(reject), [E[1]], atol=1e-12)
    # z = (1,1,1): normalise, reject e2 -> (1,0,1)/sqrt2, boost e3 -> (1,0,2)/sqrt2 -> (1,0,2)/sqrt5
    out = roboshot_embed(np.array([[1.0, 1, 1]]), reject, accept)
    np.testing.assert_allclose(out[0], np.array([1, 0, 2]) / math.sqrt(5), atol=1e-12)


def test_roboshot_sequential_equals_its_closed_form(rng):
    pairs = rng.normal(size=(4, 2, 8))
    Qs, Qh = concept_basis(pairs[:3]), concept_basis(pairs[3:])
    np.testing.assert_allclose(Qs @ Qs.T, np.eye(3), atol=1e-12)  # QR: orthonormal rows spanning the differences
    z = rng.normal(size=(5, 8))
    x = z / np.linalg.norm(z, axis=1, keepdims=True)
    closed = x @ (np.eye(8) - Qs.T @ Qs) @ (np.eye(8) + Qh.T @ Qh)
    closed /= np.linalg.norm(closed, axis=1, keepdims=True)
    np.testing.assert_allclose(roboshot_embed(z, Qs, Qh), closed, atol=1e-12)


# ------------------------------------------------------------------------------------------- TIE*


def test_tie_scales_and_translation_by_hand():
    u = E[:2]  # attribute 0 along e1, attribute 1 along e2
    train = np.array([[3.0, 0, 4], [1.0, 0, 0], [0, 2.0, 0]])  # cosines to e1: .6, 1 -> a=0; the third a=1, cos 1
    np.testing.assert_allclose(tie_scales(train, u), [0.8, 1.0])
    # test (0,3,4) -> (0,.6,.8), inferred a=1, minus 1.0 * e2 -> (0,-.4,.8)
    np.testing.assert_allclose(tie_translate(np.array([[0.0, 3, 4]]), u, np.array([0.8, 1.0])), [[0, -0.4, 0.8]])
    assert tie_scales(train[:2], u).tolist() == [0.8, 0.0]  # a value no training image is inferred as: no shift


# ------------------------------------------------------------------------------------------- FairerCLIP


def test_median_sigma_and_signed_labels_by_hand():
    # squared distances between 0, 1, 3: 1, 9, 4 -> lower median 4 -> sigma = sqrt(0.5 * 4)
    assert median_sigma(np.array([[0.0], [1.0], [3.0]])) == pytest.approx(math.sqrt(2))
    assert median_sigma(np.ones((3, 2))) == 1.0
    np.testing.assert_array_equal(signed_onehot(np.array([1, 0]), 2), [[-1, 1], [1, -1]])


def test_random_fourier_features_approximate_the_gaussian_kernel():
    x = np.random.default_rng(0).normal(size=(6, 3))
    phi = RandomFourier(20000, np.random.default_rng(1))
    f = phi(x)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    np.testing.assert_allclose(f @ f.T, np.exp(-d2 / (2 * phi.sigma**2)), atol=0.03)
    np.testing.assert_array_equal(phi(x), f)  # drawn once, at the first call


def _dense_reference(R, terms, n, gamma):
    """The authors' solver written out: B from the D x D dependence matrices over their spectral norms, C, and the
    top eigenvector of inv(C) @ B by a general eigensolver, unit 2-norm."""
    B = 0
    for coef, L in terms:
        Bk = (R.T @ (L - L.mean(0))) @ (R.T @ (L - L.mean(0))).T
        B = B + coef * Bk / np.linalg.norm(Bk, 2)
    Rc = R - R.mean(0)
    C = Rc.T @ Rc + n * gamma * np.eye(R.shape[1])
    values, vectors = np.linalg.eig(np.linalg.inv(C) @ B)
    top = np.argmax(values.real)
    v = vectors[:, top].real
    return values.real[top], v / np.linalg.norm(v)


# feature space (n >= D), sample space (n < D), and the text side (n < D, two distinct rows: a rank-2 R, where every
# dependence is along one direction, so the text configs' tau_s = 0.1 keeps the top eigenvalue positive)
@pytest.mark.parametrize("n, rff_dim, distinct, tau_s", [(60, 40, 60, 0.7), (30, 80, 30, 0.7), (30, 80, 2, 0.1)])
def test_kernel_map_solves_the_authors_eigenproblem(rng, n, rff_dim, distinct, tau_s):
    tau_z, gamma = 0.3, 1e-3
    x = rng.normal(size=(distinct, 4))[np.arange(n) % distinct]
    # labels that depend on the sample's row: no dependence term vanishes, not even with two distinct rows
    lean = np.where(np.arange(n) % 2 == 0, 0.8, 0.2)
    y, s = signed_onehot((rng.random(n) < lean).astype(int), 2), signed_onehot((rng.random(n) > lean).astype(int), 2)
    z = rng.normal(size=(n, 1))
    km = KernelMap(rff_dim, tau_s, tau_z, gamma, np.random.default_rng(0))
    km.solve(x, y, s, z)
    R, Rz = km.phi_x(x), km.phi_z(z)
    terms = [(1.0, y), (tau_z / (1 - tau_z), Rz), (-tau_s / (1 - tau_s), s)]
    value, v = _dense_reference(R, terms, n, gamma)
    assert km.top_eigenvalue == pytest.approx(value, rel=1e-6) and value > 0
    theta = km.theta[:, 0] / math.sqrt(n)
    assert abs(theta @ v) == pytest.approx(1.0, abs=1e-6)  # the same direction, unit norm
    assert np.mean(km(x)[:, 0] / z[:, 0] < 0) <= 0.5  # aligned with the other modality's codes


def test_fairerclip_config_rule_and_subsample():
    assert config_for("celeba", "RN50-quickgelu") == "celeba-rn"
    assert config_for("toy", "calib-toy-vit") == "waterbirds-vit"
    assert config_for("metashift", "ViT-L-14-336-quickgelu") == "waterbirds-vit"
    y = np.array([0] * 10 + [1] * 4)
    keep = subsample(y, {"sample_ratio1": 0.5, "sample_ratio2": 0.8, "balance": 1}, np.random.default_rng(0), 2)
    assert np.bincount(y[keep]).tolist() == [3, 2]  # of the smaller class's 4: int(4 * .8), int(4 * .5)
    keep = subsample(y, {"sample_ratio1": 0.5, "sample_ratio2": 0.8, "balance": 0}, np.random.default_rng(0), 2)
    assert np.bincount(y[keep]).tolist() == [8, 2] and np.all(np.diff(keep) > 0)


# ------------------------------------------------------------------------------------------- PPA


def test_ppa_projection_and_aggregation_by_hand():
    np.testing.assert_allclose(null_space_projection(E[:2]), np.diag([0.0, 0, 1]), atol=1e-12)
    Wg, bg = np.array([[1.0, 0], [2.0, 0], [0, 5.0]]), np.array([0.5, 0.25, 1.0])
    W, b = aggregate_groups(Wg, bg, np.array([0, 1, 3]), 2)  # pseudo-groups (c0 right), (c0 wrong), (c1 wrong)
    np.testing.assert_allclose(W, [[3.0, 0], [0, 5.0]])
    np.testing.assert_allclose(b, [0.75, 1.0])


def test_logit_adjusted_probe_is_stationary_for_its_own_objective(rng):
    x, y = rng.normal(size=(40, 3)), rng.integers(0, 3, 40)
    prior, C, tau = np.array([0.5, 0.3, 0.2]), 2.0, 1.0
    W, b = fit_adjusted_linear(x, y, 3, prior, C, tau, 500)
    logits = x @ W.T + b + tau * np.log(prior)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    resid = p - np.eye(3)[y]
    # d/dW [mean CE + ||W||^2 / (2 C n)] = resid^T x / n + W / (C n) = 0, d/db = mean resid = 0
    np.testing.assert_allclose(resid.T @ x / 40 + W / (C * 40), 0, atol=1e-6)
    np.testing.assert_allclose(resid.mean(0), 0, atol=1e-6)


# ------------------------------------------------------------------------------------------- AFR


def test_afr_weights_by_hand():
    # exp(-2 p) / N_y for p = .9, .5 (class 0, N=2) and .2 (class 1, N=1), normalised to sum 1
    raw = np.array([math.exp(-1.8) / 2, math.exp(-1.0) / 2, math.exp(-0.4)])
    np.testing.assert_allclose(afr_weights(np.array([0.9, 0.5, 0.2]), np.array([0, 0, 1]), 2.0), raw / raw.sum())


def test_afr_one_point_grid_is_that_lane_of_a_larger_grid():
    from tests.test_methods import _synthetic

    data = _synthetic()
    opts = {"steps": 30, "lambdas": [0.0], "selection": "last"}  # "last": the last step of the first grid point
    one = run_method("afr", data, options={**opts, "gammas": [4.0]}).instance
    two = run_method("afr", data, options={**opts, "gammas": [4.0, 8.0]}).instance
    assert afr_weights(np.array([0.9, 0.2]), np.array([0, 1]), np.array([2.0])).shape == (1, 2)
    np.testing.assert_allclose(one.W, two.W, rtol=1e-5, atol=1e-7)


def test_afr_step_by_hand():
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    zero_W, zero_b = t([[0.0], [0.0]]), t([0.0, 0.0])
    y = torch.tensor([0, 1])
    # from 0, equal weights: dlogits = .5 (softmax - onehot) = [-.25, .25] and [.25, -.25];
    # gW = [[-.5], [.5]] (norm .707 < 1: not clipped), loss = log 2
    W, b, loss = afr_step(
        zero_W[None], zero_b[None], zero_W, zero_b, t([[1.0], [-1.0]]), y, t([[0.5, 0.5]]), t([0.0]), 0.1
    )
    np.testing.assert_allclose(W[0].numpy(), [[0.05], [-0.05]])
    np.testing.assert_allclose(b[0].numpy(), [0.0, 0.0])
    assert float(loss[0]) == pytest.approx(math.log(2))
    # x = +-10: gW = [[-5], [5]], norm 7.07: clipped to norm 1 before the step of lr 1
    W, _, _ = afr_step(
        zero_W[None], zero_b[None], zero_W, zero_b, t([[10.0], [-10.0]]), y, t([[0.5, 0.5]]), t([0.0]), 1.0
    )
    np.testing.assert_allclose(W[0].numpy(), [[1 / math.sqrt(2)], [-1 / math.sqrt(2)]], rtol=1e-5)
    # no data weight: only lam ||theta - theta_base||^2 pulls W = [[1],[0]] back to 0 by lr * 2 lam (W - W0)
    W, _, loss = afr_step(
        t([[[1.0], [0.0]]]), zero_b[None], zero_W, zero_b, t([[1.0], [-1.0]]), y, t([[0.0, 0.0]]), t([0.1]), 0.1
    )
    np.testing.assert_allclose(W[0].numpy(), [[0.98], [0.0]])
    assert float(loss[0]) == pytest.approx(0.1)


def test_afr_split_is_the_authors_fixed_shuffle():
    base, held = afr_split(10, 21, 0.2)
    order = list(range(10))
    random.Random(21).shuffle(order)
    assert base.tolist() == order[:8] and held.tolist() == order[8:]


def test_afr_starts_at_the_base_head_and_selects_by_its_protocol():
    from tests.test_methods import _synthetic

    data = _synthetic()
    still = run_method("afr", data, options={"lr": 1e-12, "steps": 1, "gammas": [4.0], "lambdas": [0.0]})
    from sklearn.linear_model import LogisticRegression

    from calib.methods.heads import normalize

    x = normalize(data.splits["train"].z)
    base, _ = afr_split(len(x), 21, 0.2)
    clf = LogisticRegression(C=1.0, max_iter=2000).fit(x[base], data.splits["train"].y[base])
    np.testing.assert_array_equal(still.predictions["test"], clf.predict(normalize(data.splits["test"].z)))
    run = run_method("afr", data, options={"steps": 20})
    assert run.label_needs == "val_groups" and len(run.instance.grid) == 33 * 4
    assert create("afr", selection="val_worst_class").required_labels() == "none"
    other = run_method("afr", data, seed=3, options={"steps": 20})
    np.testing.assert_array_equal(run.predictions["test"], other.predictions["test"])  # fixed split: seed-free


# ------------------------------------------------------------------------------------------- marks and prompt files


def test_methods_told_the_spurious_attribute_are_marked():
    marks = {m["name"]: m["mark"] for m in describe_methods()}
    for name in ("orth_cali", "roboshot", "tie_star", "fairerclip"):
        assert marks[name] == "§"
    assert marks["ppa"] == "" and marks["dfr"] == "†" and marks["groupdro"] == "‡"
    assert method_mark("afr", "val_groups") == "†"


def test_prompt_files_fit_their_datasets():
    from calib.clip.toyclip import BIRD_WORDS, PLACE_WORDS
    from calib.data import celeba, metashift, waterbirds

    expected = {
        "waterbirds": (waterbirds.CLASS_NAMES, waterbirds.ATTR_NAMES),
        "toy": (waterbirds.CLASS_NAMES, waterbirds.ATTR_NAMES),
        "celeba": (celeba.CLASS_NAMES, celeba.ATTR_NAMES),
        "metashift": (metashift.CLASS_NAMES, metashift.ATTR_NAMES),
        "chexpert-sex": (["finding", "no finding"], ["Female", "Male"]),
    }
    for name, (classes, attrs) in expected.items():
        prompt_files.check_fits(prompt_files.load_prompt_file(name), name, classes, attrs)
    assert prompt_files.load_prompt_file("toy-quick") == prompt_files.load_prompt_file("toy")
    assert len(prompt_files.load_prompt_file("chexpert")["attr_names"]) == 6
    # the toy's prompts use the toy corpus's words only (plus land / water, which its class words contain)
    corpus = set(BIRD_WORDS) | {w for pair in PLACE_WORDS.values() for w in pair} | {"land", "water"}
    glue = {"a", "photo", "of", "the", "in", "bird"}
    for text in prompt_files.prompt_texts(prompt_files.load_prompt_file("toy")):
        words = set(text.rstrip(".").split())
        assert words <= corpus | glue, text


def test_a_bad_prompt_file_is_one_clear_error(tmp_path, monkeypatch):
    spec = json.loads(prompt_files.prompt_file("toy").read_text())
    spec["tie"]["spurious_prompts"] = [["only one value"]]
    monkeypatch.setattr(prompt_files, "PROMPT_DIR", tmp_path)
    (tmp_path / "toy.json").write_text(json.dumps(spec))
    with pytest.raises(prompt_files.PromptFileError, match="one list of prompts per attribute value"):
        prompt_files.load_prompt_file("toy")
    with pytest.raises(prompt_files.PromptFileError, match="no prompt file"):
        prompt_files.load_prompt_file("imagenet")


def test_prompt_methods_without_prompts_say_so():
    import dataclasses

    from tests.test_methods import _synthetic

    data = dataclasses.replace(_synthetic(), prompts=None)
    for name in ("orth_cali", "roboshot", "tie_star", "fairerclip"):
        with pytest.raises(ValueError, match="prompt file"):
            run_method(name, data)


def test_prompt_methods_on_toy_features_with_cached_prompt_embeddings(toy_features):
    bank = toy_features.prompts
    assert bank is not None and bank.vectors.shape == (len(bank.texts), toy_features.text.shape[1])
    for name in ("orth_cali", "roboshot", "tie_star", "ppa"):
        run = run_method(name, toy_features)
        assert run.metrics["test"]["group_n"] == np.bincount(toy_features.splits["test"].g, minlength=4).tolist()


def test_synthetic_bank_sections_are_valid():
    prompt_files.check_prompt_spec(synthetic_prompt_bank().spec, "synthetic")


def test_fairerclip_with_one_pseudo_class_drops_that_term_instead_of_dividing_by_zero(caplog):
    from tests.test_methods import _synthetic

    data = _synthetic()
    bank = data.prompts
    vectors = bank.vectors.copy()
    vectors[bank.texts.index("class 1")] = vectors[bank.texts.index("class 0")] * [1, 1, -1]  # never the argmax
    import dataclasses

    data = dataclasses.replace(data, prompts=PromptBank(bank.spec, bank.texts, vectors))
    run = run_method("fairerclip", data, options={"rff_dim": 200})
    assert "same class" in caplog.text
    assert np.isfinite(run.instance.class_codes).all()


def test_prompt_embeddings_are_cached_checked_and_rebuilt(toy_quick, tmp_path, caplog):
    from calib.clip.features import get_prompt_bank
    from calib.clip.models import load_clip

    loaded = load_clip("calib-toy-vit", "toy-quick", device="cpu")
    first = get_prompt_bank(loaded, toy_quick, tmp_path)
    (cached,) = (tmp_path / "text").glob("*-prompts-*.npz")
    stamp = cached.stat().st_mtime_ns
    again = get_prompt_bank(loaded, toy_quick, tmp_path)
    assert cached.stat().st_mtime_ns == stamp  # read back, not recomputed
    np.testing.assert_array_equal(again.vectors, first.vectors)
    # the vectors are encode_text of each prompt, unnormalised
    tokens = loaded.tokenizer(first.texts[:2])
    with torch.no_grad():
        direct = loaded.model.encode_text(tokens).float().numpy()
    np.testing.assert_allclose(first.vectors[:2], direct, rtol=1e-5, atol=1e-6)
    cached.write_bytes(b"not an npz")
    rebuilt = get_prompt_bank(loaded, toy_quick, tmp_path)
    assert "cannot be read" in caplog.text
    np.testing.assert_array_equal(rebuilt.vectors, first.vectors)
