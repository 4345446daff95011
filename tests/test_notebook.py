"""``notebooks/quickstart.ipynb`` runs end to end (tiny configuration) in a fresh kernel, and its
outputs hold the evaluation table, the score-map picture and the shell commands' output."""

import base64
import json
import os
import shutil
import tempfile

import nbclient
import nbformat
import pytest
from absl.testing import absltest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def outputs_of(notebook) -> list[dict]:
    return [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    ]


def text_of(output: dict) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    return data.get("text/markdown", "") + data.get("text/plain", "")


@pytest.mark.slow
class QuickstartNotebookTest(absltest.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.workdir = tempfile.mkdtemp()
        notebook = nbformat.read(NOTEBOOK, as_version=4)
        environment = dict(VGG_JAX_NOTEBOOK_TINY="1", VGG_JAX_NOTEBOOK_WORKDIR=cls.workdir)
        saved = {key: os.environ.get(key) for key in environment}
        os.environ.update(environment)  # the kernel inherits this process's environment
        try:
            client = nbclient.NotebookClient(
                notebook,
                timeout=600,
                kernel_name="python3",
                resources={"metadata": {"path": os.path.join(ROOT, "notebooks")}},
            )
            client.execute()
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        cls.notebook = notebook

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.workdir, ignore_errors=True)
        super().tearDownClass()

    def test_no_cell_failed(self):
        errors = [o for o in outputs_of(self.notebook) if o.get("output_type") == "error"]
        self.assertEqual(errors, [])

    def test_outputs_include_the_result_table(self):
        markdown = [
            o["data"]["text/markdown"]
            for o in outputs_of(self.notebook)
            if "text/markdown" in o.get("data", {})
        ]
        self.assertLen(markdown, 1)
        table = markdown[0]
        self.assertIn("top-1", table.lower())
        for method in ("dense", "multi-crop"):
            self.assertIn(method, table.lower())
        self.assertIn("32,48", table)  # the multi-scale rows

    def test_outputs_include_the_score_map_picture(self):
        pictures = [
            o["data"]["image/png"]
            for o in outputs_of(self.notebook)
            if "image/png" in o.get("data", {})
        ]
        self.assertLen(pictures, 1)
        self.assertTrue(base64.b64decode(pictures[0]).startswith(PNG_SIGNATURE))

    def test_imported_weights_predict_as_the_trained_net(self):
        text = "".join(text_of(o) for o in outputs_of(self.notebook))
        self.assertIn("imported net A", text)
        self.assertIn("same top classes: True", text)
        self.assertIn("RGB", text)

    def test_shell_commands_classify_files_and_list_published_weights(self):
        text = "".join(text_of(o) for o in outputs_of(self.notebook))
        self.assertIn("--source=torchvision --net=vgg16: net D", text)
        self.assertEqual(text.count("tested at Q="), 3)
        self.assertIn("notes.png: skipped, not a JPEG or PNG", text)


@pytest.mark.slow
@absltest.skipUnless(os.path.isdir(os.path.join(ROOT, ".git")), "clones this git checkout")
class ColabPathTest(absltest.TestCase):
    """The first cell on Colab: the notebook opened outside a checkout, where no environment
    variable can be set before *Runtime > Run all*. It read the clone address from
    VGG_JAX_REPO_URL only, so *Run all* stopped there; now the address is pasted into the cell."""

    def run_first_cell(self, source: str) -> str:
        notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
        outside = self.create_tempdir().full_path  # not a checkout, as on Colab
        saved = os.environ.pop("VGG_JAX_REPO_URL", None)
        try:
            nbclient.NotebookClient(
                notebook,
                timeout=120,
                kernel_name="python3",
                allow_errors=True,
                resources={"metadata": {"path": outside}},
            ).execute()
        finally:
            if saved is not None:
                os.environ["VGG_JAX_REPO_URL"] = saved
        outputs = notebook.cells[0].outputs
        return "".join(text_of(o) + o.get("evalue", "") for o in outputs)

    def test_the_first_cell_clones_from_the_address_pasted_into_it(self):
        cell = next(c for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "code")
        lines = cell.source.splitlines()
        where = next(i for i, line in enumerate(lines) if line.startswith("REPO_URL ="))
        self.assertTrue(lines[where].endswith('""'), lines[where])  # where to paste the address
        self.assertIn("REPO_URL at the top of this cell", self.run_first_cell(cell.source))
        lines[where] = lines[where][: -len('""')] + json.dumps(ROOT)  # what a user pastes
        self.assertRegex(self.run_first_cell("\n".join(lines)), r"working in \S*/vgg_jax_repo")


if __name__ == "__main__":
    absltest.main()
