"""One self-contained module with `SiDAPipeline` and every denoiser class, written into saved pipeline folders.

Diffusers loads a pipeline whose classes live outside Diffusers with `DiffusionPipeline.from_pretrained(repo,
trust_remote_code=True)` when the repository ships their source: a pipeline module at the root and a component module
in the component's folder, both named in `model_index.json` (
`diffusers.pipelines.pipeline_loading_utils._resolve_custom_pipeline_and_cls` and `get_class_obj_and_candidates`).
`standalone_source()` builds that module from this package's own source: the modules in `STANDALONE_SOURCES` are
concatenated in dependency order, their third-party imports gathered at the top and their imports of each other
dropped (the names are then defined earlier in the same file). Nothing is kept by hand, so the module always matches
the installed package; the build fails loudly if a module starts importing something it cannot resolve.

The root holds it as the pipeline module; `unet/sida_unet.py`, the component module named in `model_index.json`,
takes the denoiser classes from that already imported module. Diffusers executes a component module again each time
it loads one (`dynamic_modules_utils.get_class_in_module`) and caches the files of a folder in one package
(`diffusers_modules/local/`): had `unet` named `sida_standalone` itself, that re-run would redefine `Denoiser` after
the pipeline class was taken, and the pipeline's type checks would see two `Denoiser` classes. The component module
looks the pipeline module up in `sys.modules` rather than importing it relatively, because Diffusers would then need
a second copy in `unet/`, which its Hub download does not fetch (it takes only `unet/sida_unet.py` and the weights).
"""

from __future__ import annotations

import ast
import importlib
import inspect

import sida_diffusers
from sida_diffusers.networks import denoiser_classes


STANDALONE_MODULE = "sida_standalone"
COMPONENT_MODULE = "sida_unet"
# Inlined in this order: each module may only use names of the modules before it.
STANDALONE_SOURCES = (
    "sida_diffusers.schedule",
    "sida_diffusers.images",
    "sida_diffusers.latents",
    "sida_diffusers.safe_io.paths",
    "sida_diffusers.safe_io.files",
    "sida_diffusers.networks.base",
    "sida_diffusers.networks.edm_layers",
    "sida_diffusers.networks.edm",
    "sida_diffusers.networks.edm2",
    "sida_diffusers.networks.precond",
    "sida_diffusers.networks.precond_edm2",
    "sida_diffusers.networks.unet2d",
    "sida_diffusers.pipelines.conventions",
    "sida_diffusers.pipelines.publishing",
    "sida_diffusers.pipelines.components",
    "sida_diffusers.pipelines.few_step",
    "sida_diffusers.pipelines.pipeline_sida",
)
# Package names the inlined code imports but the standalone module does without, with what stands in for them (text,
# or a function that writes it). Publishing inlined: a pipeline that plain Diffusers loaded saves and pushes the same
# folder as SiDAPipeline does, this very module as its standalone source.
STAND_INS = {
    "check_pipeline_folder": (
        "def check_pipeline_folder(pipeline_cls, folder, passed=(), variant=None):\n"
        '    """Stand-in: sida_diffusers checks a folder before its own from_pretrained reads it; plain Diffusers,\n'
        '    which loads this module, reads the folder itself."""\n'
    ),
    "download_patterns": (
        "def download_patterns(pipeline_cls):\n"
        '    """Stand-in: sida_diffusers downloads only the files a pipeline folder is read from; plain Diffusers\n'
        '    downloads the folder itself."""\n'
        "    return None\n"
    ),
    "STANDALONE_MODULE": lambda: f"STANDALONE_MODULE = {STANDALONE_MODULE!r}\n",
    "COMPONENT_MODULE": lambda: f"COMPONENT_MODULE = {COMPONENT_MODULE!r}\n",
    "STANDALONE_SOURCES": "STANDALONE_SOURCES = (__name__,)  # stand-in: the denoiser classes are this module's\n",
    "standalone_source": (
        "def standalone_source():\n"
        '    """Stand-in: the standalone module of a saved folder is this module itself."""\n'
        '    return Path(__file__).read_text(encoding="utf-8")\n'
    ),
    "component_source": lambda: (
        "def component_source():\n"
        '    """Stand-in: the component module, as sida_diffusers wrote it."""\n'
        f"    return {component_source()!r}\n"
    ),
    "denoiser_classes": (
        "def denoiser_classes():\n"
        '    """Stand-in: the public denoiser classes of this module."""\n'
        "    return {name: obj for name, obj in sorted(globals().items()) if isinstance(obj, type)\n"
        '            and issubclass(obj, Denoiser) and obj is not Denoiser and not name.startswith("_")}\n'
    ),
}

_HEADER = '''"""SiDAPipeline and the EDM/EDM2 denoisers of sida_diffusers {version}, as one self-contained module.

Generated when the pipeline folder was saved, from the source of the sida_diffusers modules named in the section
headers below, with their imports of each other resolved inside this file. It lets Diffusers load the folder where
sida_diffusers is not installed:

    pipe = DiffusionPipeline.from_pretrained(folder_or_repo_id, trust_remote_code=True)

`SiDAPipeline.from_pretrained` in sida_diffusers never runs this file: it uses the installed package. Do not edit;
saving the pipeline rewrites it. License: Apache-2.0, as sida_diffusers.
"""

from __future__ import annotations

'''


def component_source() -> str:
    """`sida_unet.py`: the denoiser classes of the pipeline module, for the `unet` entry of model_index.json."""
    names = "\n".join(f"{name} = _pipeline_module.{name}" for name in denoiser_classes())
    return _COMPONENT.format(module=STANDALONE_MODULE, names=names)


_COMPONENT = '''"""The `unet` of this pipeline. Its classes are those of {module}.py, the pipeline module at the root
of this folder, which DiffusionPipeline.from_pretrained(folder, trust_remote_code=True) imports before the components,
so that the pipeline and its unet share one set of classes. Generated by sida_diffusers; do not edit."""

import sys

_pipeline_module = sys.modules.get(__name__.rpartition(".")[0] + ".{module}")
if _pipeline_module is None:
    raise ImportError("the classes of this unet live in {module}.py at the root of its pipeline folder; load "
                      "the pipeline with DiffusionPipeline.from_pretrained(folder, trust_remote_code=True).")
{names}
'''


def standalone_source() -> str:
    """The source of the standalone module (deterministic for a given package source tree)."""
    assembler = _Assembler()
    for module_name in STANDALONE_SOURCES:
        assembler.inline(module_name)
    source = assembler.source()
    _check_self_contained(source)
    return source


class _Assembler:
    """Concatenates modules, keeping one set of third-party imports and dropping the modules' imports of each other."""

    def __init__(self):
        self.defined = {}        # top-level name -> (module, source of its definition)
        self.imported = {}       # name bound by a third-party import -> where it comes from
        self.plain_imports = {}  # "import torch" lines, in first-seen order
        self.from_imports = {}   # third-party module -> {(name, alias)}
        self.stand_ins = []
        self.bodies = []

    def inline(self, module_name: str) -> None:
        source = inspect.getsource(importlib.import_module(module_name))
        lines = source.splitlines(keepends=True)
        keep = [True] * len(lines)
        for index, node in enumerate(ast.parse(source).body):
            is_docstring = index == 0 and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            if is_docstring or isinstance(node, (ast.Import, ast.ImportFrom)) or self._is_repeat(node, lines):
                keep[node.lineno - 1:node.end_lineno] = [False] * (node.end_lineno - node.lineno + 1)
            if isinstance(node, ast.Import):
                self._add_import(node, module_name)
            elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
                self._add_from_import(node, module_name)
            elif not is_docstring and not self._is_repeat(node, lines):
                for name in _bound_names(node):
                    if name in self.defined or name in self.imported:
                        raise ValueError(f"{module_name} defines {name}, which an earlier module of "
                                         "STANDALONE_SOURCES already binds differently; rename one of them.")
                    self.defined[name] = (module_name, _segment(lines, node))
        body = "".join(line for line, kept in zip(lines, keep) if kept).strip("\n")
        self.bodies.append(f"# ---- {module_name} {'-' * (112 - len(module_name))}\n\n{body}\n")

    def _is_repeat(self, node: ast.stmt, lines: list) -> bool:
        """The very same definition as in an earlier module (a shared constant): the first one is kept."""
        names = _bound_names(node)
        return bool(names) and all(self.defined.get(n, (None, None))[1] == _segment(lines, node) for n in names)

    def _add_import(self, node: ast.Import, module_name: str) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] == "sida_diffusers":
                raise ValueError(f"{module_name}: `import {alias.name}` cannot be inlined; import the names with "
                                 "`from ... import ...` so that they resolve inside the module.")
            self._bind(alias.asname or alias.name.split(".")[0], ("import", alias.name, alias.asname), module_name)
            self.plain_imports[f"import {alias.name}" + (f" as {alias.asname}" if alias.asname else "")] = None

    def _add_from_import(self, node: ast.ImportFrom, module_name: str) -> None:
        for alias in node.names:
            bound = alias.asname or alias.name
            if node.level or node.module.split(".")[0] == "sida_diffusers":
                if bound in self.defined and not alias.asname:
                    continue  # defined above in this same file
                if alias.name in STAND_INS and not alias.asname:
                    self.stand_ins += [] if alias.name in self.stand_ins else [alias.name]
                    continue
                raise ValueError(f"{module_name} imports {alias.name} from {node.module}, which is neither in an "
                                 "earlier module of STANDALONE_SOURCES nor in STAND_INS; add its module to "
                                 "STANDALONE_SOURCES (before this one) or give it a stand-in.")
            self._bind(bound, ("from", node.module, alias.name), module_name)
            self.from_imports.setdefault(node.module, set()).add((alias.name, alias.asname))

    def _bind(self, name: str, origin: tuple, module_name: str) -> None:
        if name in self.defined or self.imported.get(name, origin) != origin:
            raise ValueError(f"{module_name} binds {name} to {origin}, but another module of STANDALONE_SOURCES "
                             "binds it to something else; use one spelling for the import.")
        self.imported[name] = origin

    def source(self) -> str:
        imports = sorted(self.plain_imports) + [
            f"from {module} import " + ", ".join(n + (f" as {a}" if a else "") for n, a in sorted(names))
            for module, names in sorted(self.from_imports.items())]
        header = _HEADER.format(version=sida_diffusers.__version__)
        stand_ins = [text() if callable(text) else text for text in (STAND_INS[name] for name in self.stand_ins)]
        return "\n\n".join([header + "\n".join(imports) + "\n", *stand_ins, *self.bodies])


def _segment(lines: list, node: ast.stmt) -> str:
    """Source lines of a top-level statement, its decorators included."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return "".join(lines[first - 1:node.end_lineno])


def _bound_names(node: ast.stmt) -> list:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return [t.id for t in targets if isinstance(t, ast.Name)]


def _check_self_contained(source: str) -> None:
    """No import of sida_diffusers is left anywhere (function bodies included), and the module compiles."""
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        if any(name.split(".")[0] == "sida_diffusers" for name in names):
            raise ValueError(f"the standalone module still imports sida_diffusers at line {node.lineno}; move that "
                             "import out of the inlined modules or inline its module too.")
    compile(source, f"{STANDALONE_MODULE}.py", "exec")
