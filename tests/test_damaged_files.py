"""A damaged file in a saved model (cut short in a copy, edited) is named with its fault by every way of loading it:
from_pretrained, the pipeline, the translate command and the remote code."""

import json
import os
import subprocess
import sys

import pytest
from transformers import AutoModelForSeq2SeqLM, pipeline

from hf_weaknat import WeakNATForConditionalGeneration
from hf_weaknat.translate import main as translate_command

DAMAGES = {  # file -> (what is done to it, the fault the message names)
    "config.json": ("cut", "valid JSON"),  # transformers names it first where it reads the config itself
    "generation_config.json": ("cut", "is damaged: not valid JSON"),
    "tokenizer.json": ("cut", "is damaged: not valid JSON"),
    "tokenizer_config.json": ("edit", "is damaged: not valid JSON"),
    "model.safetensors": ("cut", "bytes where its header describes"),
}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, random_export):
    """{file name: an export whose copy of that file is damaged}."""
    export, copies = random_export, {}
    for name, (how, _) in DAMAGES.items():
        copy = tmp_path_factory.mktemp(name) / "export"
        subprocess.run(["cp", "-r", str(export), str(copy)], check=True)
        data = (copy / name).read_bytes()
        (copy / name).write_bytes(data[: len(data) // 2] if how == "cut" else data.replace(b"{", b"{,", 1))
        copies[name] = copy
    return export, copies


@pytest.mark.parametrize("name", list(DAMAGES))
def test_from_pretrained_and_the_pipeline_name_the_damaged_file(damaged, name):
    _, copies = damaged
    fault = DAMAGES[name][1]
    with pytest.raises(OSError, match=fault) as failure:
        AutoModelForSeq2SeqLM.from_pretrained(copies[name])
    assert str(copies[name] / name) in str(failure.value)
    with pytest.raises((OSError, ValueError)) as failure:  # the pipeline quotes the loader's error
        pipeline("weaknat-translation", model=str(copies[name]))
    assert str(copies[name] / name) in str(failure.value) and fault in str(failure.value)


@pytest.mark.parametrize("name", list(DAMAGES))
def test_the_translate_command_names_the_damaged_file_and_writes_nothing(damaged, name, tmp_path, capsys):
    _, copies = damaged
    source = tmp_path / "in.txt"
    source.write_text("Ein Mann.\n")
    assert translate_command([str(copies[name]), str(source), "-o", str(tmp_path / "out.txt")]) == 1
    error = capsys.readouterr().err
    assert str(copies[name] / name) in error and DAMAGES[name][1] in error
    assert not (tmp_path / "out.txt").exists()


def test_the_intact_export_still_loads(damaged):
    export, _ = damaged
    assert isinstance(AutoModelForSeq2SeqLM.from_pretrained(export), WeakNATForConditionalGeneration)


REMOTE = """
import json, sys
sys.modules["hf_weaknat"] = None  # the remote code alone
from transformers import AutoModelForSeq2SeqLM
found = {}
for name, directory in json.loads(sys.argv[1]).items():
    try:
        AutoModelForSeq2SeqLM.from_pretrained(directory, trust_remote_code=True)
        found[name] = "loaded"
    except Exception as error:
        found[name] = str(error)
print(json.dumps(found))
"""


def test_the_remote_code_names_the_damaged_file(damaged):
    _, copies = damaged
    weights_and_tokenizer = {n: str(copies[n]) for n in ("model.safetensors", "tokenizer.json",
                                                         "generation_config.json")}
    done = subprocess.run([sys.executable, "-c", REMOTE, json.dumps(weights_and_tokenizer)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for name, message in found.items():
        assert f"{copies[name] / name} is damaged" in message and DAMAGES[name][1] in message
