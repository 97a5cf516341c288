"""Typed errors. Every failure a user can cause maps to one of these; the CLI prints
``error: <message>`` on one line and exits non-zero."""


class CertnetError(Exception):
    """Base class of every error certnet raises on purpose."""


class InputError(CertnetError, ValueError):
    """A tensor or argument is malformed: shape, dtype, NaN/Inf, pixel range, epsilon."""


class PropertyError(InputError):
    """A VNN-LIB property, VNN-COMP result or instances file is malformed or unsupported; the
    message names ``file:line:column`` where the text is at fault."""


class ConfigError(CertnetError, ValueError):
    """An unknown method / architecture / dataset / schedule, or an invalid option."""


class DataError(CertnetError):
    """A dataset is missing, unreachable or fails its checksum."""


class CheckpointError(CertnetError):
    """A checkpoint is missing, truncated, corrupt, foreign or from a newer certnet."""


class TrainingError(CertnetError):
    """Training cannot go on: e.g. the weights became NaN or infinite (the run diverged)."""


class UnsupportedLayerError(CertnetError, TypeError):
    """A layer has no known Lipschitz bound; certnet never assumes 1.0 silently."""


class UnknownNameError(ConfigError, KeyError):
    """A name no registry holds (a KeyError too, so registries are plain mappings)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
