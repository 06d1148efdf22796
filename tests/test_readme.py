"""The README runs as written: every command line and every Python block, in order, in one folder, on small data
in the true on-disk formats (a tiny Fashion-MNIST as IDX files, scikit-learn's digits, a folder of PNGs, the user's
own package and checkpoints), so that the README cannot drift from what cnnmod does."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import user_network, write_idx_set
from PIL import Image

from cnnmod.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
# lines of the README that set a machine up or run for minutes: what covers each instead
NOT_RUN = {
    "make demo": "the set-up and the study; CI runs make test",
    "make test": "this suite",
    "pip install .": "the suite runs in the installed package",
    "cnnmod reproduce": "minutes on 2 cores; tests/test_study.py runs the study on a tiny preset",
}

USER_PACKAGE = '''from torch import nn


class MyNet(nn.Module):
    def __init__(self, num_classes=3, in_channels=3):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(in_channels, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))
'''
USER_CIFAR = '''from torch import nn


def resnet(width=16, num_classes=3, in_channels=3):
    return nn.Sequential(nn.Conv2d(in_channels, width, 7, stride=4, padding=3), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))
'''


def blocks(text: str) -> list[tuple[str, str]]:
    """The README's code, in order: ("sh", command line) for each command (continued lines joined, comments
    dropped) of a sh block or an indented block, ("python", source) for each Python block."""
    out, lang, body, lines = [], None, [], text.splitlines()
    for i, line in enumerate(lines):
        if lang is None and line.startswith("```"):
            lang, body = line[3:].strip(), []
        elif lang is not None and line.startswith("```"):
            out.append((lang, "\n".join(body)))
            lang = None
        elif lang is not None:
            body.append(line)
        elif line.startswith("    cnnmod ") and (i == 0 or not lines[i - 1].startswith("    ")):
            block = [line]
            for nxt in lines[i + 1:]:
                if not nxt.startswith("    "):
                    break
                block.append(nxt)
            out.append(("sh", "\n".join(b[4:] for b in block)))
    result = []
    for lang, source in out:
        if lang == "python":
            result.append(("python", source))
            continue
        for command in source.replace("\\\n", " ").splitlines():
            command = re.sub(r"\s+#.*$", "", command).strip()
            if command and not command.startswith("#"):
                result.append(("sh", command))
    return result


def user_files(folder: Path) -> None:
    """What the README's user has: their package (mynets), their checkpoints, a folder of their images (PATH)."""
    (folder / "mynets").mkdir()
    (folder / "mynets" / "__init__.py").write_text(USER_PACKAGE)
    (folder / "mynets" / "cifar.py").write_text(USER_CIFAR)
    sys.path.insert(0, str(folder))
    try:
        import mynets
        import mynets.cifar

        torch.manual_seed(0)
        torch.save({"model": mynets.MyNet().state_dict(), "epoch": 3}, folder / "ckpt.pth")
        torch.save(mynets.cifar.resnet(width=32).state_dict(), folder / "theirs.pth")
    finally:
        sys.path.remove(str(folder))
        for name in ("mynets", "mynets.cifar"):
            sys.modules.pop(name, None)
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(("cat", "dog", "fox")):
            d = folder / "PATH" / split / name
            d.mkdir(parents=True)
            for k in range(4):
                pixels = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                pixels[:, 10 * c:10 * c + 10] += 160
                Image.fromarray(pixels).save(d / f"{k}.png")


def test_every_block_of_the_readme_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CNNMOD_DATA", str(tmp_path / "data"))   # a tiny Fashion-MNIST, never the real one's cache
    monkeypatch.setenv("CNNMOD_CACHE", str(tmp_path / "cache"))
    write_idx_set(tmp_path / "data" / "fashion-mnist", n_train=100, n_test=40)
    work = tmp_path / "work"
    work.mkdir()
    user_files(work)
    monkeypatch.chdir(work)
    monkeypatch.syspath_prepend(str(work))
    ran, skipped = [], []
    for lang, source in blocks(README.read_text()):
        if lang == "python":
            namespace = user_network(700) if "train_ds" in source else {}
            own = namespace.get("own")
            exec(compile(source, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
            printed = capsys.readouterr().out.strip()
            if own is not None:  # the quickstart's model scores what the user's own loop scored, to the digit
                model, test = namespace["model"], namespace["test"]
                import cnnmod

                whole = cnnmod.evaluate(cnnmod.compose(namespace["modules"]), test, model=model)  # every class
                assert f"{whole['model_top1']:.2f}" == f"{own:.2f}"
                report = cnnmod.evaluate(namespace["clf"], test, model=model)
                assert float(printed) == pytest.approx(report["composed_top1"])
            ran.append(source.splitlines()[0])
            continue
        prefix = next((p for p in NOT_RUN if source.startswith(p)), None)
        if prefix is not None:
            skipped.append(prefix)
            continue
        argv = shlex.split(source)
        assert argv[0] == "cnnmod", source
        rc = main(argv[1:])
        out = capsys.readouterr()
        assert rc == 0, f"README line failed: {source}\n{out.err[-2000:]}"
        ran.append(source)
    commands = [r for r in ran if r.startswith("cnnmod")]
    assert len(commands) >= 12 and sum(1 for r in ran if not r.startswith("cnnmod")) >= 2
    assert sorted(skipped) == sorted(NOT_RUN)  # each line left out is still in the README, once
    assert os.path.isfile("pair.onnx")
