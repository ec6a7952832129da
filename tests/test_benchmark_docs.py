"""The throughput docs keep one section per device: a GPU run must not erase the CPU figures, nor the reverse."""
from pathlib import Path

from benchmarks.host_ceiling import TITLE as HOST_TITLE
from benchmarks.pipeline_throughput import DECODERS
from benchmarks.pipeline_throughput import TITLE as PIPELINE_TITLE
from benchmarks.report import splice, write_section
from benchmarks.train_throughput import TITLE as TRAIN_TITLE

TITLE = "# Throughput\n\nWhat is measured.\n"


def test_a_run_rewrites_its_own_section_and_keeps_the_other_devices():
    doc = splice(splice(TITLE, TITLE, "cpu", "cpu figures"), TITLE, "gpu", "old gpu figures")
    doc = splice(doc, TITLE, "gpu", "new gpu figures")
    assert doc == (f"{TITLE}\n<!-- BEGIN cpu run -->\ncpu figures\n<!-- END cpu run -->\n"
                   "\n<!-- BEGIN gpu run -->\nnew gpu figures\n<!-- END gpu run -->\n")


def test_rewriting_the_first_section_leaves_it_first():
    doc = splice(splice(TITLE, TITLE, "cpu", "a"), TITLE, "gpu", "b")
    assert splice(doc, TITLE, "cpu", "c") == doc.replace("\na\n", "\nc\n")


def test_a_doc_under_another_title_is_started_afresh():
    assert splice("# Old layout\n\n| table |\n", TITLE, "cpu", "x") == \
        f"{TITLE}\n<!-- BEGIN cpu run -->\nx\n<!-- END cpu run -->\n"


def test_writing_after_each_row_leaves_the_rows_measured_so_far(tmp_path):
    path = tmp_path / "doc.md"
    write_section(path, TITLE, "gpu", "| row 1 |")
    write_section(path, TITLE, "gpu", "| row 1 |\n| row 2 |")
    assert path.read_text().count("| row 1 |") == 1 and "| row 2 |" in path.read_text()


def test_the_committed_docs_start_with_their_benchmarks_titles_so_runs_keep_their_sections():
    docs = Path(__file__).resolve().parent.parent / "docs"
    for name, title in (("train_throughput.md", TRAIN_TITLE), ("pipeline_throughput.md", PIPELINE_TITLE),
                        ("host_ceiling.md", HOST_TITLE)):
        text = (docs / name).read_text()
        assert text.startswith(title) and "<!-- BEGIN cpu run -->" in text, name


def test_the_pipeline_table_puts_every_contender_beside_videoloader_and_the_host_table_has_the_baseline():
    docs = Path(__file__).resolve().parent.parent / "docs"
    pipeline = (docs / "pipeline_throughput.md").read_text()
    assert "| workload | VideoLoader | VideoLoader, whole videos | " + " | ".join(DECODERS) + " |" in pipeline
    host = (docs / "host_ceiling.md").read_text()
    assert "| TSN-8 | whole | baseline |" in host and "| dense 32x2 | whole | ours |" in host
