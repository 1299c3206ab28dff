"""User-facing errors: one sentence naming the field and the fix; the CLI prints them as one line."""

from __future__ import annotations


class GenzooError(Exception):
    """An error caused by the user's input or environment, not by a bug in genzoo."""


class RegistryError(GenzooError):
    """Unknown component, duplicate registration or invalid component spec."""


class RecipeError(GenzooError):
    """A recipe does not validate; the message names the recipe and the field."""


class CheckpointError(GenzooError):
    """A checkpoint is missing, truncated, tampered with, a pickle, or does not match its model."""


class PluginError(GenzooError):
    """A plugin failed to load while ``GENZOO_STRICT_PLUGINS=1``."""


class MissingExtra(ImportError):
    """A plugin's optional extra is not installed (raise it with the ``pip install 'genzoo[...]'`` line): ``genzoo
    plugins`` reports it like any load error, but ``GENZOO_STRICT_PLUGINS=1`` does not make it fatal, since an extra
    left out on purpose (one that conflicts with the default install) is not a broken plugin."""


class TrainingError(GenzooError):
    """Training cannot go on (a NaN or inf loss, a resume that does not match the run)."""


class OfflineError(GenzooError):
    """Something needs the network and there is none."""


class DataError(GenzooError):
    """A dataset cannot be read: a missing or empty folder, an unreadable image, a missing captions file."""
