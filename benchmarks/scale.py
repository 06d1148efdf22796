"""ImageNet scale on one machine: memory and time of a full decomposition against classes and input size, the
observation pass against plain inference, torchrun with 2 processes against 1, and a Tiny-ImageNet-sized run
end to end (issue 16). Data: random JPEGs in ImageNet's and Tiny-ImageNet's on-disk layouts, generated once
under --work; models: cnnmod's torchvision-layout ResNet-18/50 with He-initialised weights (a trained model's
masks differ, its memory and time do not).

    python benchmarks/scale.py                        # everything (about an hour on 2 cores)
    python benchmarks/scale.py --parts curve --archs resnet18 --classes 10,100 --sizes 64

Every decomposition runs in a fresh process, so its peak resident memory (VmHWM) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from common import OUT, record
from PIL import Image

HERE = Path(__file__).resolve().parent


def peak_mb() -> float:
    """This process's peak resident memory in MB: VmHWM, which (unlike ru_maxrss, kept across fork and exec)
    counts only this program."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


# ---------------------------------------------------------------------------------------------- data on disk
def _picture(rng, size: tuple[int, int], template: np.ndarray | None = None) -> Image.Image:
    """A photo-like random image: a smooth colour field (a coarse grid upsampled) plus noise; with a
    ``template`` (the class's coarse grid) images of one class look alike, so a model can learn them."""
    coarse = template if template is not None else rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    coarse = np.clip(coarse.astype(np.int16) + rng.integers(-40, 41, coarse.shape), 0, 255).astype(np.uint8)
    img = Image.fromarray(coarse).resize(size, Image.BILINEAR)
    noise = rng.integers(-12, 13, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))


def make_imagenet(root: Path, classes: int, per_class: int, val_per_class: int = 1) -> Path:
    """``root``: train/<wnid>/<wnid>_<i>.JPEG and a flat val/ labelled by LOC_val_solution.csv, as Kaggle ships
    ImageNet; JPEGs of ImageNet's typical sizes (about 500 x 375)."""
    done = root / ".complete"
    if done.is_file() and done.read_text() == f"{classes} {per_class} {val_per_class}":
        return root
    shutil.rmtree(root, ignore_errors=True)
    rng = np.random.default_rng(0)
    rows, n = ["ImageId,PredictionString"], 0
    for c in range(classes):
        wnid = f"n{c:08d}"
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(per_class):
            size = (int(rng.integers(400, 600)), int(rng.integers(300, 450)))
            _picture(rng, size).save(root / "train" / wnid / f"{wnid}_{i}.JPEG", quality=85)
        for _ in range(val_per_class):
            n += 1
            (root / "val").mkdir(exist_ok=True)
            _picture(rng, (500, 375)).save(root / "val" / f"ILSVRC2012_val_{n:08d}.JPEG", quality=85)
            rows.append(f"ILSVRC2012_val_{n:08d},{wnid} 0 0 10 10")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    done.write_text(f"{classes} {per_class} {val_per_class}")
    return root


def make_tiny_imagenet(root: Path, classes: int = 200, per_class: int = 20, val_per_class: int = 5) -> Path:
    """``root/tiny-imagenet-200`` as it ships: wnids.txt, words.txt, train/<wnid>/images/<wnid>_<i>.JPEG
    (64 x 64), val/images + val/val_annotations.txt; each class's images share a colour template."""
    d = root / "tiny-imagenet-200"
    done = d / ".complete"
    if done.is_file() and done.read_text() == f"{classes} {per_class} {val_per_class}":
        return root
    shutil.rmtree(d, ignore_errors=True)
    rng = np.random.default_rng(1)
    wnids = [f"n{c + 10**7:08d}" for c in range(classes)]
    templates = [rng.integers(0, 256, (3, 3, 3), dtype=np.uint8) for _ in wnids]
    (d / "val" / "images").mkdir(parents=True)
    ann = []
    for c, w in enumerate(wnids):
        (d / "train" / w / "images").mkdir(parents=True)
        for i in range(per_class):
            _picture(rng, (64, 64), templates[c]).save(d / "train" / w / "images" / f"{w}_{i}.JPEG", quality=90)
        for i in range(val_per_class):
            name = f"val_{c * val_per_class + i}.JPEG"
            _picture(rng, (64, 64), templates[c]).save(d / "val" / "images" / name, quality=90)
            ann.append(f"{name}\t{w}\t0\t0\t63\t63")
    (d / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (d / "words.txt").write_text("".join(f"{w}\tthing {c}, other\n" for c, w in enumerate(wnids)))
    (d / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    done.write_text(f"{classes} {per_class} {val_per_class}")
    return root


# ---------------------------------------------------------------------------------------------- one decomposition
def one(arch: str, classes: int, size: int, per_class: int, data: Path, work: Path, batch: int) -> dict:
    """Observe once, then every variant's modules of every class, each decomposition saved to disk: the peak
    resident memory and the seconds of each step (run in a fresh process)."""
    from cnnmod.core.graph import ModelGraph
    from cnnmod.core.observe import Sampling, observe
    from cnnmod.data.registry import load
    from cnnmod.data.transforms import InputSpec
    from cnnmod.io.store import save_decomposition
    from cnnmod.models import build
    from cnnmod.models.classifier import wrap
    from cnnmod.node.method import VARIANTS, DecomposeSettings, decompose
    from cnnmod.runtime import Passes

    torch.manual_seed(0)
    train = load(f"imagenet:{data}", "train")
    spec = InputSpec(3, size, size, train.mean, train.std, fit="center-crop")
    clf = wrap(build(arch, spec.shape, classes).eval(), data=train, spec=spec, arch=arch)
    graph = ModelGraph(clf.net, spec.shape)
    figures = {"arch": arch, "classes": classes, "size": size, "per_class": per_class,
               "nodes": sum(p.size for p in graph.points), "points": len(graph.points),
               "baseline_mb": peak_mb()}
    started = time.perf_counter()
    stats = observe(clf.net, graph, clf.prepare, train, Sampling(per_class), Passes(batch_size=batch, progress=False))
    figures["observe_s"] = round(time.perf_counter() - started, 2)
    figures["bits_mb"] = round(sum(t.numel() for t in stats.active.values()) * (1 + len(stats.early)) / 2**20, 1)
    figures["after_observe_mb"] = peak_mb()
    settings = DecomposeSettings(ci_samples=per_class, calibration_samples=0)
    for variant in VARIANTS:
        started = time.perf_counter()
        modules = decompose(clf, train, variant, settings=settings, stats=stats, passes=Passes(progress=False))
        figures[f"{variant}_s"] = round(time.perf_counter() - started, 2)
        figures[f"{variant}_kept"] = round(sum(m.metrics["kept_fraction"] for m in modules) / len(modules), 4)
        started = time.perf_counter()
        out = work / f"dec-{arch}-{classes}-{size}-{variant}"
        save_decomposition(modules, out, overwrite=True)
        figures[f"{variant}_save_s"] = round(time.perf_counter() - started, 2)
        figures[f"{variant}_disk_mb"] = round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20, 1)
        del modules
        shutil.rmtree(out)
    figures["peak_mb"] = peak_mb()
    figures["total_s"] = round(figures["observe_s"] + sum(figures[f"{v}_s"] + figures[f"{v}_save_s"]
                                                          for v in VARIANTS), 2)
    return figures


def curve(args) -> list[dict]:
    rows = []
    for arch in args.archs:
        for classes in args.classes:
            data = make_imagenet(args.work / f"imagenet-{classes}", classes, args.per_class)
            for size in args.sizes:
                if size != 224 and classes != max(args.classes):
                    continue  # the input-size curve at the largest class count only
                cmd = [sys.executable, str(Path(__file__)), "--one", arch, str(classes), str(size), "--data",
                       str(data), "--work", str(args.work), "--per-class", str(args.per_class)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ,
                                                                                 "CNNMOD_NO_PROGRESS": "1"})
                if proc.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------- observation cost
def overhead(args) -> list[dict]:
    """The observation pass against plain forward passes over the very same batches (in memory, so decoding is
    not in either), side by side, best of three."""
    rows = []
    for arch in args.archs:
        for size in (64, 224):
            rows.append(_overhead(arch, size))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _overhead(arch: str, size: int, classes: int = 4, per_class: int = 16) -> dict:
    from cnnmod.core.graph import ModelGraph
    from cnnmod.core.observe import observe
    from cnnmod.data.dataset import ImageSet
    from cnnmod.data.transforms import InputSpec, to_input
    from cnnmod.models import build

    torch.manual_seed(0)
    net = build(arch, (3, size, size), 1000).eval()
    spec = InputSpec(3, size, size, (0.5,) * 3, (0.25,) * 3)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (classes * per_class, 3, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(classes).repeat_interleave(per_class)
    data = ImageSet("random", "train", images, labels, [str(c) for c in range(classes)], spec.mean, spec.std)
    graph = ModelGraph(net, spec.shape)

    def prepare(x):
        return to_input(x, spec)

    def plain():
        with torch.no_grad():
            for c in range(classes):  # the same batches the pass makes: one class's inputs each
                net(prepare(images[labels == c]))

    def observed():
        observe(net, graph, prepare, data, samples=per_class, batch_size=per_class, show_progress=False)

    plain()  # warm up both
    observed()
    times = {"plain": [], "observe": []}
    for _ in range(3):
        for name, fn in (("plain", plain), ("observe", observed)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    best = {k: min(v) for k, v in times.items()}
    n = classes * per_class
    return {"arch": arch, "size": size, "images": n, "batch": per_class,
            "plain_ms_per_image": round(1000 * best["plain"] / n, 2),
            "observe_ms_per_image": round(1000 * best["observe"] / n, 2),
            "ratio": round(best["observe"] / best["plain"], 3)}


# ---------------------------------------------------------------------------------------------- command lines
def cli(args_list: list[str], env: dict | None = None, torchrun: int = 0) -> tuple[dict, float, float]:
    """One cnnmod command in a fresh process: its JSON result, wall seconds and peak memory (MB, the largest
    process's)."""
    head = [sys.executable, str(Path(__file__)), "--cli"]
    if torchrun:
        from socket import socket

        with socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        head = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={torchrun}",
                "--master-addr=127.0.0.1", f"--master-port={port}", str(Path(__file__)), "--cli"]
    started = time.perf_counter()
    proc = subprocess.run(head + args_list, capture_output=True, text=True,
                          env={**os.environ, "CNNMOD_NO_PROGRESS": "1", **(env or {})})
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"cnnmod {' '.join(args_list)} failed:\n{proc.stderr[-3000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    result = json.loads(lines[0]) if lines else {}
    peaks = [float(ln.split()[1]) for ln in proc.stdout.splitlines() if ln.startswith("PEAK_MB")]
    return result, round(seconds, 2), max(peaks) if peaks else None


def run_cli(argv: list[str]) -> None:
    from cnnmod.cli import main

    rc = main(argv)
    sys.stdout.flush()
    print(f"PEAK_MB {peak_mb()}", flush=True)
    sys.exit(rc)


def torchrun_part(args) -> dict:
    """``cnnmod decompose`` (observation, calibration, the modules' measured accuracy) and ``cnnmod
    evaluate-model`` of an imported ResNet-18 (ImageNet layout, 100 classes, at 64 x 64 so that calibration's
    modules x images passes fit in minutes) by 1 process with 2 threads and by torchrun with 2 processes of 1
    thread: identical results?"""
    import cnnmod
    from cnnmod.models import build

    work = args.work / "torchrun"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = make_imagenet(args.work / "imagenet-100", 100, args.per_class)
    torch.manual_seed(0)
    torch.save(build("resnet18", (3, 64, 64), 100).state_dict(), work / "r18.pth")
    imported, _, _ = cli(["import", "--arch", "resnet18", "--weights", str(work / "r18.pth"), "--data",
                          f"imagenet:{data}", "--input-size", "64", "--fit", "center-crop", "--mean",
                          "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--out", str(work / "model"), "--json"])
    out = {}
    for procs in (1, 2):
        env = {"OMP_NUM_THREADS": str(2 // procs)}
        dec, dec_s, dec_mb = cli(["decompose", str(work / "model"), "--out", str(work / f"dec{procs}"), "--ci-samples",
                                  str(args.per_class), "--calibration-samples", "1", "--device", "cpu", "--json"], env,
                                 torchrun=procs if procs > 1 else 0)
        ev, ev_s, ev_mb = cli(["evaluate-model", str(work / "model"), "--device", "cpu", "--json"], env,
                              torchrun=procs if procs > 1 else 0)
        out[procs] = {"decompose_s": dec_s, "decompose_peak_mb": dec_mb, "evaluate_s": ev_s, "evaluate_peak_mb": ev_mb,
                      "top1": ev["top1"], "top5": ev["top5"]}
    one, two = cnnmod.load_modules(work / "dec1"), cnnmod.load_modules(work / "dec2")
    same_masks = all(torch.equal(a.packed_masks[k], b.packed_masks[k]) for a, b in zip(one, two, strict=True)
                     for k in a.packed_masks)
    def numbers(c: dict) -> list[float]:
        return [float(c["temperature"]), *map(float, c["platt"])]

    calibration_diff = max(abs(x - y) / max(abs(x), 1e-12) for a, b in zip(one, two, strict=True)
                           for x, y in zip(numbers(a.calibration), numbers(b.calibration), strict=True))
    same_measure = all(a.metrics == b.metrics for a, b in zip(one, two, strict=True))
    row = {"model": "resnet18 (imported, torchvision layout)", "classes": 100, "size": 64,
           "per_class": args.per_class, "one_process": out[1], "two_processes": out[2],
           "identical_masks": same_masks, "calibration_max_relative_difference": float(f"{calibration_diff:.2g}"),
           "identical_measured_accuracy": same_measure,
           "identical_evaluation": out[1]["top1"] == out[2]["top1"] and out[1]["top5"] == out[2]["top5"],
           "decompose_ratio": round(out[2]["decompose_s"] / out[1]["decompose_s"], 3),
           "evaluate_ratio": round(out[2]["evaluate_s"] / out[1]["evaluate_s"], 3), "import": imported.get("out")}
    print(json.dumps(row), flush=True)
    return row


def tiny_part(args) -> dict:
    """Tiny-ImageNet's layout (200 classes, 64 x 64, the real loader): train a ResNet-20, decompose it, reuse 5
    classes, evaluate; each step's seconds and peak memory."""
    root = make_tiny_imagenet(args.work / "tiny", per_class=args.tiny_per_class)
    work = args.work / "tiny-run"
    shutil.rmtree(work, ignore_errors=True)
    common = ["--data-root", str(root), "--json"]
    steps = {}
    result, s, mb = cli(["train", "--arch", "resnet20", "--data", "tiny-imagenet", "--epochs", str(args.tiny_epochs),
                         "--batch-size", "64", "--out", str(work / "model"), *common])
    steps["train"] = {"seconds": s, "peak_mb": mb, "val_top1": result.get("val_top1"),
                      "test_top1": result.get("test_top1")}
    result, s, mb = cli(["decompose", str(work / "model"), "--out", str(work / "dec"), "--ci-samples",
                         str(args.tiny_per_class), "--calibration-samples", "0", "--no-measure", *common])
    kept = [m["kept_fraction"] for m in result["modules"]]
    steps["decompose"] = {"seconds": s, "peak_mb": mb, "modules": len(kept),
                          "kept_mean": round(sum(kept) / len(kept), 4)}
    classes = "0,1,2,3,4"
    result, s, mb = cli(["compose", f"{work / 'dec'}:{classes}", "--out", str(work / "reuse5"), *common])
    steps["compose_5"] = {"seconds": s, "peak_mb": mb}
    for mode in ("vote", "merged"):
        result, s, mb = cli(["evaluate", str(work / "reuse5"), "--mode", mode, *common])
        steps[f"evaluate_5_{mode}"] = {"seconds": s, "peak_mb": mb, "model_top1": result.get("model_top1"),
                                       "composed_top1": result.get("composed_top1"),
                                       "cost_pp": result.get("top1_change_pp")}
    result, s, mb = cli(["evaluate-model", str(work / "model"), *common])
    steps["evaluate_model"] = {"seconds": s, "peak_mb": mb, "top1": result.get("top1")}
    row = {"data": "tiny-imagenet layout, 200 classes, 64x64", "train_per_class": args.tiny_per_class,
           "epochs": args.tiny_epochs, "steps": steps}
    print(json.dumps(row), flush=True)
    return row


def compose_part(args) -> dict:
    """Compositions at scale, from a saved decomposition of every class of a ResNet (ImageNet layout, 224): 5
    of them picked (DIR:0,...,4 reads 5 module folders), and all of them merged into one pass, against the
    model's own pass on the same batch; memory and seconds, each in a fresh process."""
    arch, classes = args.compose_arch, max(args.classes)
    data = make_imagenet(args.work / f"imagenet-{classes}", classes, args.per_class)
    dec = args.work / f"compose-{arch}-{classes}"
    if not (dec / "config.json").is_file():
        proc = subprocess.run([sys.executable, str(Path(__file__)), "--save-decomposition", arch, str(classes),
                               "--data", str(data), "--work", str(dec), "--per-class", str(args.per_class)],
                              capture_output=True, text=True, env={**os.environ, "CNNMOD_NO_PROGRESS": "1"})
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
    rows = {}
    for pick in ("5", "all"):
        proc = subprocess.run([sys.executable, str(Path(__file__)), "--time-composition", str(dec), pick],
                              capture_output=True, text=True, env={**os.environ, "CNNMOD_NO_PROGRESS": "1"})
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        rows[pick] = json.loads(proc.stdout.strip().splitlines()[-1])
    row = {"arch": arch, "classes": classes, "size": 224, **rows}
    print(json.dumps(row), flush=True)
    return row


def save_decomposition_of(arch: str, classes: int, data: Path, out: Path, per_class: int) -> None:
    from cnnmod.data.registry import load
    from cnnmod.data.transforms import InputSpec
    from cnnmod.io.store import save_decomposition
    from cnnmod.models import build
    from cnnmod.models.classifier import wrap
    from cnnmod.node.method import DecomposeSettings, decompose

    torch.manual_seed(0)
    train = load(f"imagenet:{data}", "train")
    spec = InputSpec(3, 224, 224, train.mean, train.std, fit="center-crop")
    clf = wrap(build(arch, spec.shape, classes).eval(), data=train, spec=spec, arch=arch)
    modules = decompose(clf, train, "mc-bln", settings=DecomposeSettings(ci_samples=per_class, calibration_samples=0),
                        show_progress=False)
    save_decomposition(modules, out, overwrite=True)


@torch.no_grad()
def time_composition(dec: Path, pick: str, batch: int = 8) -> dict:
    import cnnmod
    from cnnmod.artifacts import read_config

    started = time.perf_counter()
    entries = read_config(dec)["modules"]
    picked = f"{dec}:{','.join(str(e['class']) for e in entries[:5])}" if pick == "5" else str(dec)
    modules = cnnmod.load_modules(picked)
    load_s = time.perf_counter() - started
    comp = cnnmod.compose(modules, mode="vote" if pick == "5" else "merged").eval()
    source = modules[0].source.eval()
    images = torch.randint(0, 256, (batch, 3, 256, 256), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)
    comp(images)  # warm up both
    source(source.prepare(images))
    times = {"composition": [], "model": []}
    for _ in range(3):
        for name, fn in (("composition", lambda: comp(images)), ("model", lambda: source(source.prepare(images)))):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    return {"modules": len(modules), "mode": comp.mode, "load_s": round(load_s, 2),
            "module_bytes_read_mb": round(sum((m_dir / "model.safetensors").stat().st_size
                                              for m_dir in cnnmod.io.store.module_paths(picked)) / 2**20, 1),
            "composition_ms_per_image": round(1000 * best["composition"] / batch, 1),
            "model_ms_per_image": round(1000 * best["model"] / batch, 1),
            "latency_ratio": round(best["composition"] / best["model"], 3), "peak_mb": peak_mb()}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--cli":
        run_cli(sys.argv[2:])
    if len(sys.argv) > 1 and sys.argv[1] == "--time-composition":
        print(json.dumps(time_composition(Path(sys.argv[2]), sys.argv[3])))
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="overhead,curve,compose,torchrun,tiny")
    p.add_argument("--archs", default="resnet18,resnet50", type=lambda s: s.split(","))
    p.add_argument("--classes", default="10,100,1000", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--sizes", default="32,64,224", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--per-class", type=int, default=2)
    p.add_argument("--tiny-per-class", type=int, default=20)
    p.add_argument("--tiny-epochs", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/cnnmod-scale"))
    p.add_argument("--compose-arch", default="resnet18")
    p.add_argument("--merge", action="store_true", help="add these parts to benchmarks/out/scale.json's")
    p.add_argument("--one", nargs=3, metavar=("ARCH", "CLASSES", "SIZE"))
    p.add_argument("--save-decomposition", nargs=2, metavar=("ARCH", "CLASSES"))
    p.add_argument("--data", type=Path)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    if args.save_decomposition:
        save_decomposition_of(args.save_decomposition[0], int(args.save_decomposition[1]), args.data, args.work,
                              args.per_class)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    if args.one:
        arch, classes, size = args.one
        print(json.dumps(one(arch, int(classes), int(size), args.per_class, args.data, args.work, args.batch)))
        return
    figures, commands = {}, []
    previous = OUT / "scale.json"
    if args.merge and previous.is_file():  # parts run at another time join the earlier ones
        earlier = json.loads(previous.read_text())
        figures, commands = earlier["figures"], [earlier["command"]]
    parts = args.parts.split(",")
    for part, fn in (("overhead", overhead), ("curve", curve), ("compose", compose_part), ("torchrun", torchrun_part),
                     ("tiny", tiny_part)):
        if part in parts:
            figures[part] = fn(args)
            (OUT / "scale.partial.json").parent.mkdir(parents=True, exist_ok=True)
            (OUT / "scale.partial.json").write_text(json.dumps(figures, indent=1))
    command = " ; ".join(commands + [("python benchmarks/scale.py " + " ".join(sys.argv[1:])).strip()])
    biggest = max(figures.get("curve", []), key=lambda r: (r["nodes"] * r["classes"]), default=None)
    summary = (f"peak {biggest['peak_mb'] / 1024:.2f} GB for {biggest['arch']} x {biggest['classes']} classes"
               if biggest else "see scale.json")
    record("scale", command, figures, summary)


if __name__ == "__main__":
    main()
