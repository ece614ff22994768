"""Figures are byte-identical across runs."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from calib.evaluation.plots import group_accuracy_bars, save_figure  # noqa: E402


def test_figures_are_reproducible(tmp_path):
    df = pd.DataFrame(
        {
            "method": ["a", "a", "b"],
            "seed": [0, 1, 0],
            "test.wga": [0.2, 0.3, 0.5],
            "test.group_acc": [[0.9, 0.2], [0.8, 0.3], [0.7, 0.5]],
        }
    )
    out = []
    for d in ("one", "two"):
        fig = group_accuracy_bars(df, ["g0", "g1"])
        out.append(save_figure(fig, "fig", tmp_path / d))
        plt.close(fig)
    for a, b in zip(*out):
        assert a.read_bytes() == b.read_bytes()
    assert out[0][0].read_bytes()[:4] == b"%PDF"
