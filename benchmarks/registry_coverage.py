"""Coverage over the model libraries' registries: every classification family of timm (one per model module,
the smallest model in it) and of torchvision (one per builder module), built as a user builds them (by their
constructors, random weights: coverage, not accuracy), run through cnnmod as a user of the library would:
node-level modules (where the model's activations allow), slim modules of two classes, their merged
composition, and a save + reload of both (the reloaded scores must be identical). Every cell is "ok", "n/a"
(node-level on a non-ReLU model: the method's own rule), "refused: <the one line>" or "TRACEBACK: <what>" (a bug).

timm and torchvision are not dependencies of cnnmod; install them beside it, without their own dependencies (the
CPU torch here stays; torchvision's compiled ops are not needed to build classifiers):

    pip install --no-deps --target /tmp/tvlib timm==1.0.31 torchvision==0.28.0 huggingface_hub pyyaml safetensors
    PYTHONPATH=/tmp/tvlib .venv/bin/python benchmarks/registry_coverage.py [--library timm,torchvision]
        [--families resnet,swin_transformer] [--timeout 300] [--max-params 60e6] [--no-doc] [--render]

Each family runs in a subprocess with a time limit (a family past it is "timeout"); rows are appended to
benchmarks/out/registry_coverage.jsonl as they finish (a rerun skips families already there unless --fresh), and
the table goes into docs/coverage.md between its registry markers.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, ROOT, record  # noqa: E402

ROWS = OUT / "registry_coverage.jsonl"
SIZES = (32, 64, 96, 128, 224)  # input sizes tried in this order: the first the model builds and runs at
CLASSES = 2
TORCHVISION_SKIP = {"quantization", "detection", "segmentation", "video", "optical_flow"}


def _libraries() -> None:
    """Import timm and torchvision as the no-deps install has them: torchvision's two op schemas defined first."""
    sys.path.insert(0, str(ROOT / "tests" / "fixtures"))
    from make_torchvision_fixture import NMS, QNMS
    for name, schema in (("nms", NMS), ("qnms", QNMS)):
        try:
            torch.library.define(f"torchvision::{name}", schema)
        except RuntimeError:
            pass  # a torchvision with its compiled ops has them


# ------------------------------------------------------------------------------------------------ the families
def _meta_params(build) -> int | None:
    try:
        with torch.device("meta"):
            return sum(p.numel() for p in build().parameters())
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device is not a candidate
        return None


def _params_of(library: str, name: str) -> int:
    if library == "timm":
        import timm
        return _meta_params(lambda: timm.create_model(name, pretrained=False)) or 0
    import torchvision
    return _meta_params(lambda: torchvision.models.get_model(name, weights=None)) or 0


def timm_families() -> dict[str, tuple[str, int]]:
    """{family (timm's model module): (its smallest model's name, its parameters)}: of the models a user would
    download (timm's ``test_`` configurations only where a family has nothing else)."""
    import timm
    return {module: found for module in timm.list_modules() if (found := _smallest_timm(module)) is not None}


def _smallest_timm(module: str) -> tuple[str, int] | None:
    import timm
    names = timm.list_models(module=module)
    names = [n for n in names if not n.startswith("test_")] or names
    sized = [(p, n) for n in names if (p := _meta_params(lambda n=n: timm.create_model(n, pretrained=False)))]
    return (min(sized)[1], min(sized)[0]) if sized else None


def torchvision_families() -> dict[str, tuple[str, int]]:
    """{family (torchvision's builder module): (its smallest classifier's name, its parameters)}."""
    import torchvision
    out: dict[str, tuple[str, int]] = {}
    for name in torchvision.models.list_models(module=torchvision.models):
        fn = torchvision.models.get_model_builder(name)
        family = fn.__module__.rsplit(".", 1)[-1]
        if family in TORCHVISION_SKIP:
            continue
        p = _meta_params(lambda fn=fn: fn(weights=None))
        if p and (family not in out or p < out[family][1]):
            out[family] = (name, p)
    return out


# ------------------------------------------------------------------------------------------------ one family
def _build(library: str, name: str, size: int, with_size: bool):
    if library == "timm":
        import timm
        kwargs = {"model_name": name, "num_classes": CLASSES, **({"img_size": size} if with_size else {})}
        return "timm:create_model", kwargs, timm.create_model(pretrained=False, **kwargs)
    import torchvision
    kwargs = {"name": name, "num_classes": CLASSES, **({"image_size": size} if with_size else {})}
    return "torchvision.models:get_model", kwargs, torchvision.models.get_model(weights=None, **kwargs)


def built(library: str, name: str):
    """(reference, arguments, network, input size): the first size of :data:`SIZES` it builds and runs at (with
    its image size passed where the constructor takes one)."""
    failures, sizes = [], list(SIZES)
    if library == "timm":  # and the size it was made for, where that is none of them
        import timm
        native = timm.create_model(name, pretrained=False).pretrained_cfg.get("input_size", (3, 224, 224))[-1]
        sizes += [native] if native not in sizes else []
    for size in sizes:
        for with_size in (True, False):
            try:
                ref, kwargs, net = _build(library, name, size, with_size)
                net.eval()
                with torch.no_grad():
                    out = net(torch.randn(2, 3, size, size))
                if isinstance(out, torch.Tensor) and out.shape == (2, CLASSES):
                    return ref, kwargs, net, size
                failures.append(f"{size}: returns {type(out).__name__}")
            except Exception as e:  # noqa: BLE001 - try the next size
                failures.append(f"{size}: {type(e).__name__}")
    raise RuntimeError("does not build and run at " + ", ".join(dict.fromkeys(failures)))


def run_one(library: str, name: str) -> dict:
    import cnnmod
    from cnnmod.composition.build import composing_for
    from cnnmod.data.dataset import ImageSet
    from cnnmod.data.transforms import InputSpec
    from cnnmod.io.store import load_composer, save_network
    from cnnmod.runtime import Passes

    row: dict = {"library": library, "model": name}
    try:
        ref, kwargs, net, size = built(library, name)
    except RuntimeError as e:
        return {**row, "build": str(e)}
    row.update(size=size, params=sum(p.numel() for p in net.parameters()))
    g = torch.Generator().manual_seed(0)
    n = 48
    data = ImageSet("synthetic", "train", torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g),
                    torch.arange(n) % CLASSES, [f"c{i}" for i in range(CLASSES)], (0.5,) * 3, (0.25,) * 3)
    spec = InputSpec(3, size, size, (0.5,) * 3, (0.25,) * 3)
    quiet = Passes(progress=False)
    with cnnmod.trusting(True):
        clf = cnnmod.wrap(net, spec=spec, class_names=data.class_names, arch=ref, arch_args=kwargs)
        images = data.images[:6]
        for kind, options in (("node", {}), ("channel", {"samples": 16, "step_samples": 16, "held_out": 4})):
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    modules = cnnmod.decompose(clf, data, granularity=kind, passes=quiet, calibration_samples=0,
                                               **options)
                    row[kind] = "ok"
                    composer = cnnmod.compose(modules, "merged" if kind == "channel" else None)
                    if kind == "channel":
                        row["merged"] = "ok"
                    cnnmod.save_decomposition(modules, Path(tmp) / "d")
                    loaded = cnnmod.load_modules(Path(tmp) / "d")
                    if kind == "channel":
                        save_network(composing_for(modules, "merged").name, composer, [clf], Path(tmp) / "c")
                    with torch.no_grad():
                        pairs = [(cnnmod.compose(loaded, "vote")(images), cnnmod.compose(modules, "vote")(images))]
                        if kind == "channel":
                            again, _ = load_composer(Path(tmp) / "c")
                            pairs.append((again(images), composer(images)))
                    gap = max(float((a - b).abs().max()) for a, b in pairs)
                    row[f"{kind}_reload"] = "identical" if gap == 0 else (
                        f"to rounding ({gap:.0e})" if gap <= 1e-5 else f"DIFFERENT ({gap:.2g})")
                    if kind == "channel":
                        row["kept"] = round(sum(m.kept_fraction() for m in modules) / len(modules), 3)
                        whole = modules[0].metrics.get("whole") or {}
                        row["kept_whole"] = len(whole)
                except cnnmod.UserError as e:
                    text = str(e)
                    row[kind] = ("n/a" if kind == "node" and "ReLU-family" in text else "refused: ") + \
                        ("" if kind == "node" and "ReLU-family" in text else text[:200])
                except Exception as e:  # noqa: BLE001 - recorded: a traceback is a bug to fix
                    row[kind] = f"TRACEBACK: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                    row[f"{kind}_trace"] = traceback.format_exc()[-2500:]  # the innermost frames
            row[f"{kind}_seconds"] = round(time.perf_counter() - started, 1)
    return row


# ------------------------------------------------------------------------------------------------ the table
def _cell(v) -> str:
    v = "-" if v is None else str(v)
    return v if len(v) <= 90 else v[:87] + "..."


def table(rows: list[dict]) -> str:
    lines = ["| library | family | model (input) | node-level | slim | merged | reload | attention kept whole |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reload = r.get("channel_reload") or r.get("node_reload")
        lines.append("| " + " | ".join(_cell(c) for c in (
            r["library"], r["family"], f"{r['model']} ({r.get('size', '-')})", r.get("node", r.get("build")),
            r.get("channel", r.get("build")), r.get("merged"), reload, r.get("kept_whole"))) + " |")
    return "\n".join(lines)


def _reloads(r: dict) -> bool:
    """The reloaded folders score what the made ones did: bit for bit, or to float rounding (a sliced weight
    read from a file lies differently in memory than the one sliced in place)."""
    return str(r.get("channel_reload")).startswith(("identical", "to rounding"))


def counts(rows: list[dict]) -> dict:
    def ok(r, k):
        return r.get(k) == "ok"
    relu = [r for r in rows if r.get("node") != "n/a" and "build" not in r]
    return {"families": len(rows), "measured": sum(not str(r.get("build")).startswith("not ") for r in rows),
            "slim+merged+reload": sum(ok(r, "channel") and ok(r, "merged") and _reloads(r) for r in rows),
            "node (of those it applies to)": f"{sum(ok(r, 'node') for r in relu)}/{len(relu)}",
            "tracebacks": sum("TRACEBACK" in str(r.get(k)) for r in rows for k in ("node", "channel")),
            "timeouts": sum(r.get("channel") == "timeout" for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--library", default="timm,torchvision")
    parser.add_argument("--families", default="", help="only these families (comma-separated)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per family")
    parser.add_argument("--fresh", action="store_true", help="measure families already in the rows file again")
    parser.add_argument("--max-params", type=float, default=60e6,
                        help="families whose smallest model is larger are listed, not run (2 CPU cores)")
    parser.add_argument("--no-doc", action="store_true", help="do not write the table into docs/coverage.md")
    parser.add_argument("--render", action="store_true", help="run nothing: the table of the rows measured so far")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # LIBRARY:MODEL, in the subprocess
    args = parser.parse_args()
    _libraries()
    if args.one:
        library, name = args.one.split(":", 1)
        print(json.dumps(run_one(library, name)))
        return
    done = {} if args.fresh or not ROWS.exists() else {
        (r["library"], r["family"]): r for r in map(json.loads, ROWS.read_text().splitlines())}
    wanted = set(filter(None, args.families.split(",")))
    OUT.mkdir(parents=True, exist_ok=True)
    unmeasured = {}  # listed, never run: in the table as such
    for library in args.library.split(","):
        listed = OUT / f"registry_{library}_families.json"  # building every model on the meta device takes minutes
        if not listed.exists():
            listed.write_text(json.dumps(timm_families() if library == "timm" else torchvision_families(), indent=1))
        families = {f: v if isinstance(v, list) else [v, _params_of(library, v)]  # a list of names alone
                    for f, v in json.loads(listed.read_text()).items()}
        if library == "timm":  # listed before test configurations were passed over
            families.update({f: list(_smallest_timm(f)) for f, (n, _) in families.items() if n.startswith("test_")})
        for family, (name, params) in sorted(families.items(), key=lambda kv: kv[1][1]):  # the smallest first
            if (wanted and family not in wanted) or (library, family) in done or (
                    args.render and params <= args.max_params):
                unmeasured[library, family] = {"library": library, "family": family, "model": name, "params": params,
                                               "build": "not measured yet (no run reached it)"}
                continue
            if params > args.max_params:
                row = {"library": library, "model": name, "family": family, "params": params,
                       "build": f"not run: {params / 1e6:.0f}M parameters, over --max-params"}
                done[library, family] = row
                continue
            started = time.perf_counter()
            try:
                got = subprocess.run([sys.executable, __file__, "--one", f"{library}:{name}"], capture_output=True,
                                     text=True, timeout=args.timeout)
                lines = [ln for ln in got.stdout.splitlines() if ln.startswith("{")]
                row = json.loads(lines[-1]) if lines else {
                    "library": library, "model": name, "build": f"crashed: {got.stderr.strip()[-200:]}"}
            except subprocess.TimeoutExpired:
                row = {"library": library, "model": name, "node": "timeout", "channel": "timeout"}
            row.update(family=family, seconds=round(time.perf_counter() - started, 1))
            done[library, family] = row
            with ROWS.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_trace")})[:400], flush=True)
    rows = sorted([*done.values(), *(r for k, r in unmeasured.items() if k not in done)],
                  key=lambda r: (r["library"], r["family"]))
    text = table(rows) + "\n\n" + ", ".join(f"{k}: {v}" for k, v in counts(rows).items())
    print(text)
    doc = ROOT / "docs" / "coverage.md"
    if not args.no_doc:
        body = doc.read_text()
        doc.write_text(re.sub(r"(<!-- registry:begin -->\n).*?(\n<!-- registry:end -->)",
                              lambda m: m.group(1) + text + m.group(2), body, flags=re.S))
    record("registry_coverage", "PYTHONPATH=/tmp/tvlib python benchmarks/registry_coverage.py " +
           " ".join(sys.argv[1:]), {"counts": counts(rows), "rows": rows}, json.dumps(counts(rows)))


if __name__ == "__main__":
    main()
