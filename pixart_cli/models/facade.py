"""Lean imports: a stage process loads the modules it runs, not whole libraries.

``import diffusers`` plus one model class costs a stage process several times ``import torch`` (issue 10):
- ``diffusers.models.transformers`` (and ``unets``, ``autoencoders``, ``hooks``) import every model of their
  kind in their package ``__init__``;
- ``diffusers.utils.torch_utils`` imports ``torch._dynamo`` (sympy, torch.fx, FSDP...) only to mark classes
  for ``torch.compile`` (``maybe_allow_in_graph``), and falls back to a no-op when it is missing;
- ``diffusers.quantizers`` imports all of ``transformers`` for one class it compares configs against in
  ``PipelineQuantizationConfig``, and falls back to a stand-in class when it is missing;
- ``diffusers.utils`` computes ``importlib.metadata.packages_distributions()`` (a stat of every installed file of
  most distributions) for a map it reads only when certain optional packages are installed: it gets the map
  unevaluated, computed the first time it is read.

``import_diffusers(name)`` imports one diffusers module with those three avoided:
- the eager packages are registered without running their ``__init__``; their submodules import as usual,
  and the first attribute their ``__init__`` would define runs it in full (so nothing is lost, only deferred);
- the two optional imports are hidden while the module imports (their fallbacks are no-ops in eager mode,
  which is all we run), and visible again afterwards, so code that needs them later still gets them.

``keep_out`` hides packages that a process does not use at all (bitsandbytes, peft) for its whole life.
Nothing here changes a computation: the same classes run the same forward passes (tests/test_parity.py).

This is the one module of pixart_cli that imports diffusers or transformers (ruff's TID251 refuses them
elsewhere): everything else asks here. ``PIXART_LEAN=0`` turns every trick off (plain imports, nothing hidden),
so that a library upgrade that breaks one can be told apart from one that breaks pixart.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Mapping
from contextlib import contextmanager

LEAN_ENV = "PIXART_LEAN"
# One thread at a time through what the libraries switch process-wide for a moment: sys.modules (the lean imports
# here), the default dtype and the meta-device patches of model building (memory.meta_model, source.load_component).
# --devices runs a worker thread per device; each builds its models under this lock and computes outside it.
LOCK = threading.RLock()


def lean() -> bool:
    """Whether the lean imports are on (``PIXART_LEAN=0`` turns them off)."""
    return os.environ.get(LEAN_ENV) != "0"


def plain(name: str):
    """Import a module of diffusers or transformers the library's own way, whole (model builders, bitsandbytes
    quantization, test oracles)."""
    return importlib.import_module(name)


# Packages whose __init__ imports every model of their kind; a stage needs one module from each.
EAGER_PACKAGES = (
    "diffusers.models.transformers",
    "diffusers.models.unets",
    "diffusers.models.autoencoders",
    "diffusers.hooks",
)
# Imported by diffusers inside try/except with a no-op fallback; costly (torch._dynamo: sympy, fx, FSDP;
# transformers: the whole library) and unused in eager inference.
OPTIONAL_AT_IMPORT = ("torch._dynamo", "transformers.utils.quantization_config")


def keep_out(quantized: bool = False, lora: bool = False) -> None:
    """Make diffusers and transformers see bitsandbytes (unless quantizing) and peft (unless loading a LoRA)
    as not installed in this process: both import them whenever they are installed, at a cost of seconds.

    A ``None`` entry in sys.modules reads as "not installed" to ``importlib.util.find_spec``. Call before
    importing either library.
    """
    if not lean():
        return
    for name, needed in (("bitsandbytes", quantized), ("peft", lora)):
        if not needed and name not in sys.modules and "diffusers" not in sys.modules:
            sys.modules[name] = None


def import_diffusers(name: str, hide_optional: bool = True):
    """Import one diffusers module (``diffusers.models.autoencoders.vae``, ...) without the rest of diffusers.

    ``hide_optional=False`` for a module that needs torch._dynamo at import (AutoencoderKL, through
    ``diffusers.loaders.peft`` and the group-offloading hooks): only a VAE checkpoint in another layout imports it.
    """
    with LOCK:
        if name in sys.modules:
            return sys.modules[name]
        if not lean():
            return importlib.import_module(name)
        import torch  # noqa: F401  (torch itself imports some of what is hidden below; it must come first)

        with _hidden(OPTIONAL_AT_IMPORT), _package_map_on_first_use():
            importlib.import_module("diffusers")
            for package in EAGER_PACKAGES:
                _shallow_package(package)
            if hide_optional:
                return importlib.import_module(name)
        return importlib.import_module(name)


def import_eager(name: str):
    """Import a diffusers module whose classes mark methods ``@torch.compiler.disable`` where they are defined
    (the step caches' hooks), with that decorator standing for the identity while it imports.

    ``torch.compiler.disable`` imports torch._dynamo (sympy, torch.fx: a second or more of a denoise process) to
    wrap a method so that torch.compile leaves it alone; outside torch.compile the wrapper only calls the method.
    So this is for processes that do not compile (``--compile`` imports the module plainly, ``import_diffusers``).
    """
    if name in sys.modules or not lean():
        return import_diffusers(name)
    import torch

    _compiled_check_without_dynamo()
    real = torch.compiler.disable

    def identity(fn=None, recursive=True, **_):
        return fn if fn is not None else (lambda function: function)

    torch.compiler.disable = identity
    try:
        return import_diffusers(name)
    finally:
        torch.compiler.disable = real


def _compiled_check_without_dynamo() -> None:
    """diffusers' ``is_compiled_module`` (which ``unwrap_module``, called by every hook, asks) tests
    ``hasattr(torch, "_dynamo")``, and that attribute imports torch._dynamo. A module can be compiled only once
    torch._dynamo is imported, so the same answer comes from sys.modules."""
    torch_utils = import_diffusers("diffusers.utils.torch_utils")
    if getattr(torch_utils.is_compiled_module, "_pixart", False):
        return

    def is_compiled_module(module) -> bool:
        dynamo = sys.modules.get("torch._dynamo")
        return dynamo is not None and isinstance(module, dynamo.eval_frame.OptimizedModule)

    is_compiled_module._pixart = True
    torch_utils.is_compiled_module = is_compiled_module


def register_block(block_class, **metadata) -> None:
    """Tell diffusers' TransformerBlockRegistry (First Block Cache asks it where a block returns its hidden states)
    about ``block_class``, as diffusers' own registration does, without that registration, which imports every
    transformer model of diffusers (seconds). Asked for a class it does not hold, the registry then runs diffusers'
    registration, so nothing is lost."""
    helpers = import_eager("diffusers.hooks._helpers")
    registry = helpers.TransformerBlockRegistry
    if registry._is_registered or not lean():
        return
    registry._is_registered = True
    registry._registry[block_class] = helpers.TransformerBlockMetadata(_cls=block_class, **metadata)
    get = registry.get.__func__

    def get_or_register_all(cls, model_class):
        if model_class not in cls._registry:
            helpers._register_transformer_blocks_metadata()
        return get(cls, model_class)

    registry.get = classmethod(get_or_register_all)


def scheduler_class(name: str):
    """diffusers' scheduler class ``name`` (None if diffusers has no such class), imported without scipy."""
    diffusers = import_diffusers("diffusers")
    with LOCK, _scipy_deferred():
        found = getattr(diffusers, name, None)
    return found if isinstance(found, type) else None


def make_scheduler(name: str, config: dict, **overrides):
    """``scheduler_class(name).from_config(config, **overrides)``, without scipy.

    ``from_config`` imports every scheduler class the config is compatible with (``_get_compatibles``)."""
    cls = scheduler_class(name)
    with LOCK, _scipy_deferred():
        return cls.from_config(config, **overrides)


@contextmanager
def _scipy_deferred():
    """Scheduler modules imported in the block skip their ``import scipy.stats``.

    Most scheduler modules run ``if is_scipy_available(): import scipy.stats`` at import, for beta sigmas only
    (``use_beta_sigmas``, which no PixArt scheduler config sets): a second of a denoise process on an H200
    (2026-11-28). They import with diffusers told scipy is missing, then get a stand-in ``scipy`` that imports
    the real submodule on first use, so beta sigmas still work.
    """
    if not lean():
        yield
        return
    import_utils = sys.modules["diffusers.utils.import_utils"]
    scipy_installed = import_utils.is_scipy_available()
    before = set(sys.modules)
    import_utils._scipy_available = False
    try:
        yield
    finally:
        import_utils._scipy_available = scipy_installed
    if scipy_installed:
        for name in set(sys.modules) - before:
            module = sys.modules[name]
            if name.startswith("diffusers.schedulers.") and module is not None and "scipy" not in vars(module):
                module.scipy = _ScipyOnFirstUse()


class _ScipyOnFirstUse:
    """Stands for ``scipy`` in a module that skipped ``import scipy.stats``: ``.stats`` imports it then."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        return importlib.import_module(f"scipy.{name}")


def import_transformers(name: str):
    """Import one transformers module (``transformers.models.t5.tokenization_t5``) without transformers'
    ``__init__``, which scans every model file of the library to build its lazy index (about a second).
    Submodules read only ``__version__`` from the package at import; anything else asked of it runs the
    ``__init__`` in full, in place."""
    with LOCK:
        if name in sys.modules:
            return sys.modules[name]
        if lean() and "transformers" not in sys.modules:
            from importlib import metadata  # not `import importlib.metadata`: that would make `importlib` local

            _shallow_package("transformers", {"__version__": metadata.version("transformers")})
            _shallow_package("transformers.models")
        if not lean():
            return importlib.import_module(name)
        with _package_map_on_first_use():
            return importlib.import_module(name)


class _PackageMapOnFirstUse(Mapping):
    """``importlib.metadata.packages_distributions()``, computed the first time it is read. diffusers computes it
    when ``diffusers.utils`` imports and reads it only for optional packages that are installed (optimum,
    flashinfer, modelopt); computing it stats every file of every installed distribution without a
    ``top_level.txt`` (torch's and the CUDA wheels' among them): about a second of each process on the benchmark
    GPU machine (profile of 2026-12-01), for a map that is then never read."""

    def __init__(self, compute):
        self._compute, self._map = compute, None

    def _mapping(self) -> dict:
        if self._map is None:
            self._map = self._compute()
        return self._map

    def __getitem__(self, key):
        return self._mapping()[key]

    def __iter__(self):
        return iter(self._mapping())

    def __len__(self) -> int:
        return len(self._mapping())


@contextmanager
def _package_map_on_first_use():
    """While the block imports a library, ``importlib.metadata.packages_distributions()`` returns the map
    unevaluated (_PackageMapOnFirstUse): the same answers, computed only if they are asked for."""
    from importlib import metadata

    original = metadata.packages_distributions
    metadata.packages_distributions = lambda: _PackageMapOnFirstUse(original)
    try:
        yield
    finally:
        metadata.packages_distributions = original


@contextmanager
def _hidden(names):
    """Names not imported yet read as not installed while the block runs, and importable again after it."""
    added = [name for name in names if name not in sys.modules]
    for name in added:
        sys.modules[name] = None
    try:
        yield
    finally:
        for name in added:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]


def _shallow_package(name: str, attributes: dict | None = None) -> None:
    """Register package ``name`` without running its ``__init__`` (holding only ``attributes``); the first
    attribute asked of it that a submodule did not already set runs the ``__init__`` in full, in place."""
    if name in sys.modules:
        return
    parent_name, _, child = name.rpartition(".")
    parent = importlib.import_module(parent_name) if parent_name else None
    if parent is not None and child in vars(parent):  # a lazy parent may already hold it
        return
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    vars(module).update(attributes or {})

    def complete(attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        del module.__getattr__
        spec.loader.exec_module(module)
        completed = sys.modules.get(name, module)
        if completed is not module:
            # A lazy package (transformers) replaces itself in sys.modules at the end of its __init__; whoever
            # holds this object (`from transformers import X` looks X up on it twice) reads through to it.
            module.__getattr__ = lambda later: getattr(completed, later)
        return getattr(completed, attribute)

    module.__getattr__ = complete
    sys.modules[name] = module
    if parent is not None:
        setattr(parent, child, module)


def diffusers_constant(relative_path: str, name: str):
    """A literal constant (a dict of numbers, ...) of a diffusers source file, read without importing it.

    The PixArt pipelines define their resolution-binning tables beside the pipeline classes; importing those
    modules loads transformers' T5 and the pipeline machinery. tests/test_lean.py checks every table read
    here against the imported module.
    """
    import ast
    from pathlib import Path

    source = Path(importlib.util.find_spec("diffusers").origin).parent / relative_path
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{name} not found in diffusers/{relative_path}")


def diffusers_default(relative_path: str, class_name: str, function: str, parameter: str):
    """The literal default of a parameter of a diffusers class's method, read from its source without importing it
    (PixArtSigmaPAGPipeline's ``pag_applied_layers``: importing the pipeline loads transformers' T5)."""
    import ast
    from pathlib import Path

    source = Path(importlib.util.find_spec("diffusers").origin).parent / relative_path
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if not (isinstance(node, ast.ClassDef) and node.name == class_name):
            continue
        for method in node.body:
            if isinstance(method, ast.FunctionDef) and method.name == function:
                arguments = method.args
                positional = arguments.posonlyargs + arguments.args
                pairs = list(zip(positional[len(positional) - len(arguments.defaults) :], arguments.defaults))
                pairs += [(arg, value) for arg, value in zip(arguments.kwonlyargs, arguments.kw_defaults) if value]
                for arg, value in pairs:
                    if arg.arg == parameter:
                        return ast.literal_eval(value)
    raise LookupError(f"{class_name}.{function}({parameter}=...) not found in diffusers/{relative_path}")
