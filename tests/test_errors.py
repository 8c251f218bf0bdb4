"""Every exception class jaxsd defines is about the user's input, so it derives from InputError: the
CLI then reports it as one message (tests/test_cli.py). A class for an internal failure would be added
to INTERNAL with the reason it is not the user's to fix."""

import importlib
import inspect
import pkgutil

import jaxsd
from jaxsd.errors import InputError, InputNotFoundError

INTERNAL: dict[str, str] = {}  # "module.Class" -> why it is not an input error


def _exception_classes() -> dict[str, type]:
    found = {}
    for info in pkgutil.walk_packages(jaxsd.__path__, "jaxsd."):
        module = importlib.import_module(info.name)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, Exception) and not issubclass(obj, Warning) and obj.__module__ == info.name:
                found[f"{info.name}.{name}"] = obj
    return found


def test_every_jaxsd_error_class_is_an_input_error():
    classes = _exception_classes()
    assert {"jaxsd.errors.ConfigError", "jaxsd.data.manifest.CacheMismatch", "jaxsd.data.records.SidecarMismatch",
            "jaxsd.pipelines.loading.PipelineFolderError", "jaxsd.convert.folder.ComponentError",
            "jaxsd.convert.safetensors_io.SafetensorsError", "jaxsd.convert.rules.ConversionError",
            "jaxsd.text.tokenizers.TokenizerError"} <= set(classes)  # the walk sees them
    not_input = [name for name, cls in classes.items() if not issubclass(cls, InputError) and name not in INTERNAL]
    assert not_input == [], not_input
    assert issubclass(classes["jaxsd.convert.folder.ComponentError"], InputNotFoundError)
    assert issubclass(InputNotFoundError, FileNotFoundError)
