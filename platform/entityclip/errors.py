"""User-facing errors.

Everything raised as an `EntityClipError` is shown to the user as one clear line by the CLI
(no traceback); anything else is a bug and keeps its traceback.
"""


class EntityClipError(Exception):
    """Base class for errors caused by input, configuration or environment."""


class ConfigError(EntityClipError):
    """A config file or override is malformed or names an unknown field."""


class StorageError(EntityClipError):
    """A path or URI cannot be read or written (missing file, unreachable S3, ...)."""


class InputError(EntityClipError):
    """A user-supplied image, text or request is invalid."""


class InputTooLarge(InputError):
    """A user-supplied text, image or request is over its size limit (HTTP 413)."""


class NotFound(InputError):
    """A user asked for something that does not exist, e.g. an unknown gallery image (HTTP 404)."""


class TrainingInterrupted(EntityClipError):
    """Training stopped (e.g. its workers died more often than train.max_failures allows); the
    run can be resumed from its last checkpoint."""


class TrackingError(EntityClipError):
    """The MLflow tracking server cannot be reached or refused a request."""


def find_user_error(exc: BaseException) -> EntityClipError | None:
    """The EntityClipError behind `exc`, also when Ray wrapped it: a task error (`cause`), a
    Train V2 WorkerGroupError (`worker_failures`) or ControllerError (`controller_failure`)."""
    queue, seen = [exc], set()
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, EntityClipError):
            # A RayTaskError(InputError) stringifies as the remote traceback; its cause is the
            # original error with the plain message.
            inner = getattr(current, "cause", None)
            return inner if isinstance(inner, EntityClipError) else current
        queue.extend(getattr(current, "worker_failures", {}).values())
        queue += [getattr(current, "controller_failure", None), getattr(current, "cause", None),
                  current.__cause__, current.__context__]
    return None
