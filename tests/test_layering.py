"""python -m unittest tests.test_layering  ->  a dot per test, then "OK".

Layering: the core imports no machinery, no import cycles, and the core with the scripts runs alone.
"""
import ast
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import unittest


from test_core import HERE, SCRIPTS, offline_env, read_bytes, vit, what_trains


# ============================================================================= layering: who imports whom

CORE = {"lora", "normtune", "common", "results_file"}  # the method: readable alone
MACHINERY = {"flags", "cpu", "sources", "run", "checkpoint", "fast_lora", "cli"}  # what protects and speeds up a run


def project_imports() -> dict:
    """{module: the project modules it imports} for every top-level .py file, from its source (ast): every
    import statement, at the top or inside a function (a lazy import is a dependency too)."""
    names = {f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and f[:-3].isidentifier()}
    graph = {}
    for name in sorted(names):
        tree = ast.parse(read_bytes(os.path.join(HERE, name + ".py")), name + ".py")
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = (found & names) - {name}
    return graph


class TestLayering(unittest.TestCase):
    """The core reads alone: it imports nothing of the machinery; the machinery imports no script; no cycles."""

    @classmethod
    def setUpClass(cls):
        cls.graph = project_imports()

    def test_core_imports_only_core(self):
        self.assertLessEqual(CORE | MACHINERY, set(self.graph))
        for name in sorted(CORE):
            self.assertLessEqual(self.graph[name], CORE, f"{name}.py imports {sorted(self.graph[name] - CORE)}")

    def test_machinery_imports_only_core_and_machinery(self):
        for name in sorted(MACHINERY):
            self.assertLessEqual(self.graph[name], CORE | MACHINERY,
                                 f"{name}.py imports {sorted(self.graph[name] - CORE - MACHINERY)}")

    def test_no_import_cycles(self):
        done, path = set(), []

        def visit(name):
            if name in path:
                self.fail("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
            if name in done:
                return
            path.append(name)
            for other in sorted(self.graph[name]):
                visit(other)
            path.pop()
            done.add(name)
        for name in sorted(self.graph):
            visit(name)
        self.assertIn("train_lora", done)  # the scripts were looked at too


class TestCoreAlone(unittest.TestCase):
    """A folder holding only the core and the five scripts (what a teacher copies) imports every script and
    trains with every recipe: the tooling is imported only by main(), where a command-line run needs it."""

    FILES = sorted(f"{name}.py" for name in CORE) + sorted(SCRIPTS.values())
    CODE = textwrap.dedent("""
        import importlib, importlib.util, json, os, sys
        sys.path.insert(0, os.getcwd())  # -I left out the folder itself, and everything else but the packages
        import torch
        import common
        torch.manual_seed(0)
        images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
        out = {}
        for method, script in json.loads(sys.argv[1]).items():
            model = common.build_model(common.BACKBONE, 10, 32, pretrained=False)  # no download
            importlib.import_module(script[:-3]).recipe(model)
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt, sched = common.make_optimizer(model, common.DEFAULT_LRS[method], 0.01, 1)
            batches = common.train_batches(common.Split(images, torch.arange(4), []), torch.arange(4),
                                           torch.Generator().manual_seed(0), 4, 32, (0.5,) * 3, (0.5,) * 3)
            (step, loss), = common.train_epoch(model, opt, sched, batches, "fp32")
            out[method] = dict(trainable=[n for n, p in model.named_parameters() if p.requires_grad],
                               changed=[n for n, p in model.named_parameters() if not torch.equal(p, before[n])],
                               loss=loss.item())
        tooling = ("cli", "cpu", "flags", "run", "sources", "checkpoint", "fast_lora", "evaluate", "summarize",
                   "grouping", "plots", "notes_file")
        print(json.dumps(dict(out=out, loaded=sorted(set(tooling) & set(sys.modules)),
                              findable=[m for m in tooling if importlib.util.find_spec(m)])))
    """)

    def test_scripts_and_recipes_need_only_the_core(self):
        with tempfile.TemporaryDirectory() as tmp:
            for f in self.FILES:
                shutil.copy(os.path.join(HERE, f), tmp)
            self.assertEqual(sorted(os.listdir(tmp)), self.FILES)  # exactly these nine files
            proc = subprocess.run([sys.executable, "-I", "-c", self.CODE, json.dumps(SCRIPTS)], cwd=tmp,
                                  env=offline_env(), capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        result = json.loads(proc.stdout)
        self.assertEqual((result["loaded"], result["findable"]), ([], []))  # no tooling, not even on the path
        want = what_trains(vit())
        self.assertEqual(set(result["out"]), set(want))
        for method, got in result["out"].items():
            with self.subTest(method=method):
                self.assertEqual(set(got["trainable"]), want[method])
                self.assertEqual(set(got["changed"]), want[method])  # one step moved exactly those
                self.assertTrue(math.isfinite(got["loss"]))


if __name__ == "__main__":
    unittest.main()
