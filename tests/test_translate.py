"""weaknat-translate: one line in, one line out, in input order, and no partial output on any failure."""

import importlib.metadata
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from transformers import pipeline

from hf_weaknat.translate import load_model, main, one_line, split_lines

SENTENCES = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Eine Frau liest ein Buch am Strand.",
             "Kinder spielen.", "Ein Mädchen in einem Karateanzug bricht ein Brett mit einem Tritt."]


@pytest.fixture(scope="module")
def export(random_export):
    return random_export


@pytest.fixture(scope="module")
def one_by_one(export):
    """Each sentence translated alone by the pipeline: what line i of the command's output must hold."""
    translator = pipeline("weaknat-translation", model=str(export))
    return {s: translator(s)[0]["translation_text"].strip() for s in SENTENCES}


def translate(tmp_path, export, data: bytes, *args) -> tuple[int, bytes | None]:
    source, target = tmp_path / "input.txt", tmp_path / "output.txt"
    source.write_bytes(data)
    status = main([str(export), str(source), "-o", str(target), "--quiet", *args])
    return status, target.read_bytes() if target.exists() else None


def test_each_output_line_is_the_translation_of_the_same_input_line(tmp_path, export, one_by_one):
    lines = SENTENCES + SENTENCES[::-1]  # batched by length, so the order inside a batch differs from the input's
    status, output = translate(tmp_path, export, "".join(s + "\n" for s in lines).encode(), "--batch_size", "3")
    assert status == 0
    assert output.decode().split("\n")[:-1] == [one_by_one[s] for s in lines]


def test_empty_and_whitespace_lines_stay_empty_and_nothing_shifts(tmp_path, export, one_by_one):
    data = f"\n{SENTENCES[0]}\n   \n\t\n{SENTENCES[1]}\n\n".encode()
    status, output = translate(tmp_path, export, data)
    assert status == 0
    assert output.decode().split("\n") == ["", one_by_one[SENTENCES[0]], "", "", one_by_one[SENTENCES[1]], "", ""]


def test_crlf_and_a_last_line_without_newline_count_as_lines(tmp_path, export, one_by_one):
    status, output = translate(tmp_path, export, f"{SENTENCES[0]}\r\n{SENTENCES[1]}".encode())
    assert status == 0
    assert output.decode() == f"{one_by_one[SENTENCES[0]]}\n{one_by_one[SENTENCES[1]]}\n"


def test_only_newline_ends_a_line():
    # str.splitlines would also split on form feed, U+2028 and others, shifting every later line
    assert split_lines("a\x0cb\u2028c\nd\x1ce\n".encode()) == ["a\x0cb\u2028c".encode(), "d\x1ce".encode()]
    assert split_lines(b"") == [] and split_lines(b"\n") == [b""] and split_lines(b"x") == [b"x"]
    assert one_line("two\nlines\u2028here") == "two lines here"


def test_a_blank_file_gives_an_empty_output_file(tmp_path, export):
    assert translate(tmp_path, export, b"") == (0, b"")


def test_invalid_utf8_is_named_by_line_number_and_nothing_is_written(tmp_path, export, capsys):
    data = f"{SENTENCES[0]}\n".encode() + b"caf\xe9 au lait\n" + f"{SENTENCES[1]}\n".encode() + b"\xff\xfe\x00\n"
    assert translate(tmp_path, export, data) == (1, None)
    error = capsys.readouterr().err
    assert "not valid UTF-8: line 2, 4" in error and "--invalid replace" in error
    assert list(tmp_path.iterdir()) == [tmp_path / "input.txt"]  # no temporary file left behind either


def test_invalid_utf8_lines_replaced_or_emptied_when_asked(tmp_path, export, one_by_one, capsys):
    data = f"{SENTENCES[0]}\n".encode() + b"caf\xe9 au lait\n" + f"{SENTENCES[1]}\n".encode()
    status, output = translate(tmp_path, export, data, "--invalid", "empty")
    assert status == 0 and output.decode() == f"{one_by_one[SENTENCES[0]]}\n\n{one_by_one[SENTENCES[1]]}\n"
    assert "line 2 is not valid UTF-8: written as an empty line" in capsys.readouterr().err
    status, output = translate(tmp_path, export, data, "--invalid", "replace")
    lines = output.decode().split("\n")
    assert status == 0 and len(lines) == 4 and lines[0] == one_by_one[SENTENCES[0]] and lines[1]


def test_a_very_long_line_is_truncated_with_a_warning_naming_it(tmp_path, export, one_by_one):
    long_line = " ".join(SENTENCES * 20)
    with pytest.warns(UserWarning, match=r"line 2: source of \d+ tokens truncated to the model's limit of 32"):
        status, output = translate(tmp_path, export, f"{SENTENCES[0]}\n{long_line}\n{SENTENCES[1]}\n".encode())
    lines = output.decode().split("\n")
    assert status == 0 and len(lines) == 4 and lines[0] == one_by_one[SENTENCES[0]] and lines[2] == one_by_one[
        SENTENCES[1]]


def test_a_failure_leaves_an_earlier_output_untouched_and_no_partial_file(tmp_path, export, capsys):
    (tmp_path / "output.txt").write_text("an earlier complete translation\n")
    assert translate(tmp_path, export, b"Ein Mann.\n", "--num_beams", "2", "--do_sample")[0] == 1
    assert "generation arguments" in capsys.readouterr().err
    assert (tmp_path / "output.txt").read_text() == "an earlier complete translation\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt", "output.txt"]


def test_an_interrupt_mid_file_leaves_no_output(tmp_path, export, monkeypatch, capsys):
    import hf_weaknat.translate as command

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "translate_lines", interrupted)
    assert translate(tmp_path, export, b"Ein Mann.\n") == (130, None)
    assert "interrupted; no output written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [tmp_path / "input.txt"]


def test_an_unwritable_output_path_fails_before_translating(tmp_path, export, capsys):
    source = tmp_path / "input.txt"
    source.write_text("Ein Mann.\n")
    assert main([str(export), str(source), "-o", str(tmp_path / "no" / "such" / "dir" / "out.txt")]) == 1
    assert f"cannot write the output to {tmp_path / 'no' / 'such' / 'dir' / 'out.txt'}" in capsys.readouterr().err
    assert main([str(export), str(source), "-o", str(tmp_path)]) == 1
    assert "it is a directory" in capsys.readouterr().err


def test_a_missing_input_or_model_is_named(tmp_path, export, capsys):
    assert main([str(export), str(tmp_path / "missing.txt")]) == 1
    error = capsys.readouterr().err
    assert "cannot read" in error and "missing.txt" in error
    source = tmp_path / "input.txt"
    source.write_text("Ein Mann.\n")
    assert main([str(tmp_path / "no-model"), str(source), "-o", str(tmp_path / "out.txt")]) == 1
    assert "cannot load" in capsys.readouterr().err and not (tmp_path / "out.txt").exists()


def test_one_translation_per_line_only(tmp_path, export, capsys):
    assert translate(tmp_path, export, b"Ein Mann.\n", "--num_beams", "2", "--generate",
                     "num_return_sequences=2") == (1, None)
    assert "num_return_sequences must be 1" in capsys.readouterr().err


def test_generation_arguments_reach_generate(tmp_path, export):
    beam = pipeline("weaknat-translation", model=str(export))(SENTENCES[:2], num_beams=4, max_length=5)
    status, output = translate(tmp_path, export, "\n".join(SENTENCES[:2]).encode(), "--num_beams", "4",
                               "--generate", "max_length=5")
    assert status == 0 and output.decode().split("\n")[:-1] == [b["translation_text"].strip() for b in beam]


def test_dtype_loads_the_network_in_half_precision_for_the_torch_engine(tmp_path, export, capsys):
    translator = pipeline("weaknat-translation", model=str(export), dtype=torch.bfloat16)
    expected = [t["translation_text"].strip() for t in translator(SENTENCES[:3])]
    status, output = translate(tmp_path, export, "\n".join(SENTENCES[:3]).encode(), "--dtype", "bfloat16")
    assert status == 0 and output.decode().split("\n")[:-1] == expected
    assert load_model(str(export), "torch", "cpu", None, None, "bfloat16")[1].dtype == torch.bfloat16
    status, _ = translate(tmp_path, export, b"x\n", "--dtype", "bfloat16", "--engine", "onnx", "--onnx_file", "m.onnx")
    assert status != 0 and "--dtype bfloat16 is for --engine torch" in capsys.readouterr().err


def test_stdin_to_stdout_as_a_module_with_a_closing_line(export, one_by_one):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "hf_weaknat.translate", str(export)], cwd=REPO, env=env,
                          input="\n".join(SENTENCES[:3]).encode(), capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().split("\n") == [one_by_one[s] for s in SENTENCES[:3]] + [""]
    assert "3 lines (3 sentences, 0 empty) in" in done.stderr.decode()
    assert "sentences/s" in done.stderr.decode()


def test_the_console_script_is_declared():
    scripts = {e.name: e.value for e in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("weaknat-translate") == "hf_weaknat.translate:main"


def test_onnx_engine_translates_as_torch_and_makes_its_graph_once(tmp_path, export, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("WEAKNAT_CACHE", str(tmp_path / "cache"))
    data = "\n".join(SENTENCES).encode()
    status, torch_output = translate(tmp_path, export, data)
    assert status == 0
    # the fp32 graph, given: the same tokens as PyTorch
    from hf_weaknat import export_onnx

    graphs = export_onnx(str(export), tmp_path / "onnx", quantize=False)
    status, onnx_output = translate(tmp_path, export, data, "--engine", "onnx", "--onnx_file",
                                    str(graphs / "model.onnx"))
    assert status == 0 and onnx_output == torch_output
    # the int8 graph, made on first use and cached
    capsys.readouterr()
    status, first = translate(tmp_path, export, data, "--engine", "onnx")
    assert status == 0 and "making the ONNX int8 graph" in capsys.readouterr().err
    assert len(first.decode().split("\n")) == len(SENTENCES) + 1
    assert len(list((tmp_path / "cache" / "onnx").glob("*/model_int8.onnx"))) == 1
    status, second = translate(tmp_path, export, data, "--engine", "onnx")
    assert status == 0 and second == first and "making" not in capsys.readouterr().err


def test_a_binary_file_is_refused_naming_its_lines_and_nothing_is_written(tmp_path, export, capsys):
    (tmp_path / "output.txt").write_text("an earlier complete translation\n")
    binary = bytes(range(256)) * 8 + b"\n\x00\x01\x02\n" + bytes(range(255, -1, -1))  # NULs, bad UTF-8, no text
    status, output = translate(tmp_path, export, binary)
    assert status == 1 and output == b"an earlier complete translation\n"
    assert "9 line(s) of the input are not valid UTF-8: line 2, 3, 4, 5, 6, 7, 8, 9, 11." in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt", "output.txt"]
