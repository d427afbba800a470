"""python -m unittest tests.test_plots  ->  a dot per test, then "OK".

plots.py (summarize.py --plots): layout of the figures, what they read.
"""
import os
import tempfile
import unittest


import grouping
import plots

from tests.helpers import HAVE_MATPLOTLIB, lora_row, other_row, results_row, write_results


def boxes_overlap(a, b) -> bool:
    """Two matplotlib Bboxes share more than a pixel."""
    return a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1


class TestPlotLayout(unittest.TestCase):
    """The accuracy-vs-parameters plot's geometry, without matplotlib: ticks that do not run together,
    labels that cover neither each other nor a marker."""

    def test_decade_ticks(self):
        self.assertEqual(plots.decade_ticks(0.035 / 2.5, 100 * 2.5), [0.1, 1.0, 10.0, 100.0])
        self.assertEqual(plots.decade_ticks(2.0, 6.0), [2.0, 5.0])  # within one decade: 1-2-5

    def test_labels_cover_nothing(self):
        # LoRA and Hybrid 2 px apart (5.10 % and 5.26 %), NormTune and the linear probe apart, a point at the edge
        points = [(300, 200), (302, 203), (120, 190), (40, 60), (590, 199)]
        sizes = [(70, 11), (80, 11), (90, 11), (85, 11), (100, 11)]
        obstacles = [(x - 7, y - 7, 14, 14) for x, y in points]
        spots = plots.spread_labels(points, sizes, obstacles, (0, 0, 600, 300))
        boxes = [(x0, y0, w, h) for (x0, y0, _, _), (w, h) in zip(spots, sizes)]
        for i, a in enumerate(boxes):
            self.assertTrue(0 <= a[0] and a[0] + a[2] <= 600 and 0 <= a[1] and a[1] + a[3] <= 300, a)
            for b in boxes[i + 1:] + obstacles:
                overlap = a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]
                self.assertFalse(overlap, (a, b))
        self.assertEqual(spots[4][2], "left")  # no room on the right of the last point
        self.assertFalse(spots[2][3])  # a label with room stays where it belongs, without a leader line


@unittest.skipUnless(HAVE_MATPLOTLIB, "matplotlib is not installed (optional; `pip install matplotlib` to test "
                                      "summarize.py --plots)")
class TestPlotsRead(unittest.TestCase):
    """The figures as a reader sees them: one colour and marker per method in every panel, the setting in a
    title or the caption, labels and tick labels that do not overlap, reliability titles with image size
    and counts."""

    ROWS = ([other_row("linear", s, a, "4.0", **{"tuned_params_%": "0.0349"}) for s, a in enumerate((73, 73.5))]
            + [other_row("normtune", s, a, "1.2", **{"tuned_params_%": "0.2086"}) for s, a in enumerate((83.5, 84))]
            + [lora_row(s, a) for s, a in enumerate((84.2, 84.6))]
            + [other_row("hybrid", s, a, "1.3", **{"tuned_params_%": "5.2642"}) for s, a in enumerate((84.5, 84.9))]
            + [other_row("full", s, a, "1.5", **{"tuned_params_%": "100.0000"}) for s, a in enumerate((84.2, 84.6))])

    def figure(self, rows):
        plt = plots.import_pyplot()
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "r.csv")
            write_results(path, rows)
            groups = grouping.group_runs(grouping.read_results(path))
        fig = plots.acc_vs_params_figure(plt, groups)
        self.addCleanup(plt.close, fig)
        fig.canvas.draw()
        return fig, fig.canvas.get_renderer()

    def check_panels(self, fig, renderer):
        colours = {}
        for ax in (a for a in fig.axes if a.get_visible()):
            for line in ax.lines:
                if line.get_marker() not in (None, "None", "", "_"):  # a point (not an error bar's cap)
                    colours.setdefault(line.get_marker(), set()).add(line.get_color())
            labels = [t for t in ax.texts if t.get_text()]
            ticks = [t for t in ax.get_xticklabels() if t.get_text()]
            for group in (labels, ticks):
                extents = [t.get_window_extent(renderer) for t in group]
                for i, a in enumerate(extents):
                    for b, t in zip(extents[i + 1:], group[i + 1:]):
                        self.assertFalse(boxes_overlap(a, b), f"{group[i].get_text()!r} / {t.get_text()!r}")
            self.assertEqual([t.get_text() for t in ticks], ["0.1 %", "1 %", "10 %", "100 %"])
        self.assertEqual(set(colours), {"v", "s", "o", "^", "*"})
        self.assertTrue(all(len(c) == 1 for c in colours.values()), colours)  # one colour per method...
        self.assertEqual(len(set.union(*colours.values())), 5)  # ...and five methods, five colours
        legend = [t.get_text() for t in fig.legends[0].get_texts()]
        self.assertEqual(legend, ["linear probe", "NormTune", "LoRA", "Hybrid", "full fine-tune"])

    def test_one_setting(self):
        fig, renderer = self.figure(self.ROWS)
        self.check_panels(fig, renderer)
        texts = [t.get_text() for t in fig.texts]
        self.assertTrue(any(t.startswith("Setting: dataset=cifar10") and "img=224" in t for t in texts), texts)
        labels = [t.get_text() for t in fig.axes[0].texts]
        self.assertIn("LoRA 84.4", labels)
        self.assertIn("Hybrid 84.7", labels)

    def test_several_settings(self):
        rows = self.ROWS + [dict(r, img_size="112", **{"acc@1": str(float(r["acc@1"]) - 3)}) for r in self.ROWS]
        fig, renderer = self.figure(rows)
        self.check_panels(fig, renderer)
        titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
        self.assertEqual(titles, ["setting 1: img=224", "setting 2: img=112"])
        self.assertTrue(any(t.startswith("Every panel: dataset=cifar10") for t in (x.get_text() for x in fig.texts)))

    def test_reliability_title_names_image_size_and_counts(self):
        row = results_row(method="hybrid", seed="2", img_size="112", train_samples="2000", epochs="1",
                          backbone="deit_tiny_patch16_224", precision="fp32")
        calib = dict(ece=1.5, count=[0, 400, 600], confidence=[0, 0.5, 0.8], accuracy=[0, 0.5, 0.8])
        title = plots.reliability_title(calib, row)
        self.assertIn("Hybrid, seed 2", title)
        self.assertIn("deit_tiny_patch16_224, 112 px, 2,000 training / 1,000 test images, 1 epoch, fp32", title)
        self.assertIn("ECE 1.50 % over 3 equal-width confidence bins", title)


if __name__ == "__main__":
    unittest.main()
