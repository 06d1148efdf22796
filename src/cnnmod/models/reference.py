"""Architectures by reference: a user's own network, named ``package.module:callable`` (a factory or a class, as
torch.hub entry points and timm's ``create_model`` are), with keyword arguments.

An artifact records the reference and the arguments; loading rebuilds the network by importing that module and
calling the callable, which runs the user's code. So loading it needs the user's permission, the way Hugging
Face's ``trust_remote_code`` works: ``--trust-code`` on the command line, ``trust_code=True`` in the API
(:func:`trusting`), or the environment variable ``CNNMOD_TRUSTED_CODE`` naming trusted packages
(``CNNMOD_TRUSTED_CODE=mynets,lab.models``). Making a model (``cnnmod import``, ``cnnmod train``) with an
``--arch`` the user types is that permission. The zoo never needs it.

Code that prefers names registers its factories with :func:`register_arch`; a class registered so records the
arguments every instance was made with, so a plain instance passed to :func:`cnnmod.decompose` can be saved
and reloaded.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from ..errors import UserError

TRUST_ENV = "CNNMOD_TRUSTED_CODE"
_REFERENCE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
_TRUST: ContextVar[bool] = ContextVar("cnnmod_trust_code", default=False)
REGISTERED: dict[str, tuple[Callable[..., nn.Module], str]] = {}  # name -> (callable, its reference)
CLASS_ARGS = ("num_classes", "in_channels")  # filled in from the data when the callable takes them


def is_reference(name: str) -> bool:
    return ":" in name


@contextmanager
def trusting(allow: bool = True) -> Iterator[None]:
    """Context: artifacts whose architecture is a reference may import and run it (when ``allow``)."""
    token = _TRUST.set(_TRUST.get() or allow)
    try:
        yield
    finally:
        _TRUST.reset(token)


def allows_code(fn):
    """Decorator for a loader: it takes ``trust_code=False``; with ``True`` it may import and run the code an
    artifact's architecture names (see :func:`trusting`)."""
    @functools.wraps(fn)
    def load(*args, trust_code: bool = False, **kwargs):
        with trusting(trust_code):
            return fn(*args, **kwargs)
    return load


def _trusted(module: str) -> bool:
    if _TRUST.get():
        return True
    allowed = [p.strip() for p in os.environ.get(TRUST_ENV, "").split(",") if p.strip()]
    return any(module == p or module.startswith(p + ".") for p in allowed)


def how_to_trust(arch: str) -> str | None:
    """For an architecture that is a user's code: how later commands are allowed to load it, once for a shell
    session (None for the zoo and registered names, which need nothing)."""
    if not is_reference(arch) or arch in REGISTERED:
        return None
    package = arch.partition(":")[0].split(".")[0]
    return (f"its architecture is your code ({arch}): commands that load it import {package}, so they need "
            f"--trust-code, or once for this shell: export {TRUST_ENV}={package}")


def resolve(ref: str, *, trusted: bool = False) -> Callable[..., nn.Module]:
    """The callable a reference names, imported (only when trusted, or ``trusted`` says the user typed it)."""
    if not _REFERENCE.match(ref):
        raise UserError(f"«arch» {ref!r} is not a reference of the form package.module:callable "
                        "(e.g. mynets.cifar:resnet20)")
    module, _, attr = ref.partition(":")
    if not trusted and not _trusted(module):
        raise UserError(f"this artifact's architecture is {ref}: loading it imports and runs {module}; allow it with "
                        f"«trust_code» (trust_code=True), or once for the shell: export "
                        f"{TRUST_ENV}={module.split('.')[0]}")
    try:
        obj = importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"cannot import {module} for the architecture {ref} ({e}); install it, or run from the "
                        "folder that holds it, or add that folder to PYTHONPATH")
    except Exception as e:  # noqa: BLE001 - the user's module failed while importing: say so in one line
        raise UserError(f"importing {module} for the architecture {ref} failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''}")
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{module} has no {attr!r} (from the architecture {ref})")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"the architecture {ref} is a {type(obj).__name__}, not a class or function that builds "
                        "the network")
    return obj


def _parameters(fn: Callable) -> tuple[list[str], bool]:
    """The keyword arguments ``fn`` accepts, and whether it takes any (``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return [], True
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def complete_args(fn: Callable, args: dict, num_classes: int, in_channels: int) -> dict:
    """``args`` with ``num_classes`` and ``in_channels`` added where ``fn`` takes them and they are not given."""
    names, _ = _parameters(fn)
    out = dict(args)
    for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if key in names and key not in out:
            out[key] = value
    return out


def call(fn: Callable, ref: str, args: dict) -> nn.Module:
    """``fn(**args)``, with every way it can fail said in one line."""
    names, var_kw = _parameters(fn)
    unknown = sorted(set(args) - set(names)) if not var_kw else []
    if unknown:
        raise UserError(f"{ref} takes no argument {', '.join(unknown)}; it takes {', '.join(names) or 'none'}")
    try:
        net = fn(**args)
    except Exception as e:  # noqa: BLE001 - the user's constructor failed: one line, not its traceback
        raise UserError(f"{ref}({', '.join(f'{k}={v!r}' for k, v in args.items())}) failed: {type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''}")
    if not isinstance(net, nn.Module):
        raise UserError(f"{ref} returned a {type(net).__name__}, not a torch.nn.Module")
    return net


def check_output(net: nn.Module, name: str, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """One image through ``net``: its output must be (1, num_classes) logits."""
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = net(torch.zeros(1, *input_shape, device=device))
    except Exception as e:  # noqa: BLE001 - the user's forward failed on the stated input
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise UserError(f"{name} fails on a {'x'.join(map(str, input_shape))} input ({type(e).__name__}: {first}); "
                        "check the input size and channels the model expects")
    finally:
        net.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{name} returns {shape} for one image, not (1, {num_classes}) logits for the data's "
                        f"{num_classes} classes; pass --arch-arg num_classes={num_classes} or return the logits")


def _json_safe(args: dict) -> bool:
    try:
        json.dumps(args)
    except (TypeError, ValueError):
        return False
    return True


def register_arch(name: str | None = None):
    """Decorator: a factory or ``nn.Module`` class registered under ``name`` (default: its own name), so that
    ``--arch NAME`` builds it. A registered class records the arguments each instance is made with, so that a
    plain instance can be saved and reloaded (:func:`reference_of`)."""
    def register(obj):
        key = name or obj.__name__
        ref = f"{obj.__module__}:{obj.__qualname__}"
        if isinstance(obj, type) and issubclass(obj, nn.Module):
            init = obj.__init__

            @functools.wraps(init)
            def recording_init(self, *args, **kwargs):
                bound = inspect.signature(init).bind(self, *args, **kwargs)
                bound.apply_defaults()
                recorded = {k: v for k, v in bound.arguments.items() if k != "self"}
                init(self, *args, **kwargs)
                object.__setattr__(self, "_cnnmod_arch", (key, recorded))

            obj.__init__ = recording_init
        REGISTERED[key] = (obj, ref)
        return obj
    return register


def reference_of(net: nn.Module) -> tuple[str, dict] | None:
    """The (architecture, arguments) a plain network can be rebuilt from: a registered class records its own;
    None where nothing records them."""
    recorded = getattr(net, "_cnnmod_arch", None)
    if recorded is None:
        return None
    key, args = recorded
    if REGISTERED.get(key, (None,))[0] is not type(net) or not _json_safe(args):
        return None
    return key, dict(args)


def callable_for(name: str) -> tuple[Callable[..., nn.Module], str]:
    """The callable of a registered name or of a reference, and the reference an artifact records. A reference
    to something registered in this process needs no trust (its code is already the user's); any other is
    imported only when trusted."""
    if name in REGISTERED:
        fn, ref = REGISTERED[name]
        return fn, ref
    for fn, ref in REGISTERED.values():
        if ref == name:
            return fn, ref
    return resolve(name), name
