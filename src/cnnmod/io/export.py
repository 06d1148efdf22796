"""ONNX export of a module or a composition: uint8 images (B, C, H, W) in, scores p_c (B, K) out."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .. import __version__
from ..artifacts import atomic_file
from ..errors import UserError
from .store import load_composer


def export_onnx(paths: list[str | Path], out: str | Path, overwrite: bool = False, check: bool = True,
                calibration: str | None = None) -> dict:
    """Export the composition of the modules at ``paths`` (one module folder gives a one-column classifier: its
    Platt-calibrated probability unless ``calibration`` says otherwise);
    with ``check``, onnxruntime's scores are compared with cnnmod's on a random batch (of another size, where the
    exported batch size is dynamic)."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise UserError("exporting to ONNX needs the onnx extra: pip install 'cnnmod[onnx]' (onnx and onnxruntime)")
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} exists already; choose another file or pass «overwrite»")
    comp = load_composer(paths, "cpu", calibration)[0].eval()
    if calibration is None and len(comp.qualified_names) == 1 and comp.calibration == "none":
        try:  # one module alone is a detector: its calibrated probability, 0.5 the balanced decision
            comp = load_composer(paths, "cpu", "platt")[0].eval()
        except UserError:  # made without calibration: its own score
            pass
    calibration = comp.calibration
    shape = tuple(comp.input_shape)
    example = torch.randint(0, 256, (2, *shape), dtype=torch.uint8)
    with atomic_file(out) as tmp:
        dynamic = _export(comp, example, tmp)
        _describe(tmp, comp, shape, calibration)
        result = {"out": str(out), "classes": [f"{c}" for c in comp.qualified_names], "input_shape": list(shape),
                  "input": "uint8 images (batch, channels, height, width)", "output": "scores p_c (batch, classes)",
                  "batch": "any" if dynamic else example.shape[0], "calibration": calibration,
                  "bytes": tmp.stat().st_size}
        if check:
            result["max_abs_difference"] = _check(str(tmp), comp, shape, None if dynamic else example.shape[0])
    return result


def _export(comp, example: torch.Tensor, path: Path) -> bool:
    """Export with any batch size; where an op cannot be exported so (adaptive pooling to a size other than 1
    once the batch is symbolic), with the example's batch size. Returns whether the batch is dynamic."""
    errors = []
    for dynamic in (True, False):
        axes = {"images": {0: "batch"}, "scores": {0: "batch"}} if dynamic else None
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(comp, (example,), str(path), dynamo=False, input_names=["images"],
                                  output_names=["scores"], dynamic_axes=axes)
            return dynamic
        except Exception as e:  # noqa: BLE001 - the exporter's failures are reported in one line below
            errors.append(str(e).strip().splitlines()[0][:140] if str(e).strip() else type(e).__name__)
    raise UserError(f"torch.onnx cannot export this composition: {errors[-1]}")


def _describe(path: Path, comp, shape: tuple[int, int, int], calibration: str) -> None:
    """Write into the file's metadata what a user of it needs: the classes in output order, the input it takes
    and the cnnmod that made it (``onnx.load(path).metadata_props``; onnxruntime's ``get_modelmeta()``)."""
    import onnx

    model = onnx.load(str(path))
    described = {
        "cnnmod_version": __version__,
        "classes": json.dumps(list(comp.qualified_names)),
        "input": json.dumps({"name": "images", "dtype": "uint8", "layout": "NCHW", "shape": ["batch", *shape],
                             "range": [0, 255], "normalisation": "inside the model"}),
        "output": json.dumps({"name": "scores", "meaning": "p_c per class, in the order of classes",
                              "calibration": calibration}),
    }
    del model.metadata_props[:]
    for key, value in described.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name, model.producer_version = "cnnmod", __version__
    onnx.save(model, str(path))


def _check(path: str, comp, shape: tuple[int, int, int], batch: int | None) -> float | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    images = torch.randint(0, 256, (batch or 5, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": images.numpy()})[0])
    with torch.no_grad():
        expected = comp(images)
    diff = float((got - expected).abs().max())
    if diff > 1e-4:
        raise UserError(f"the exported ONNX model disagrees with cnnmod by {diff:.2g}; please report this model")
    return diff
