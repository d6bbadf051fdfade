"""One exception type for every problem a user can fix.

The CLI prints a ``HypruneError`` as a short message and exits with code 2, without a traceback:
the message must say what was wrong, what was expected and how to fix it.
"""


class HypruneError(Exception):
    """A problem with the user's input (model, data, target, plan, paths)."""


def validation_message(where: str, error, allowed=None) -> str:
    """One line for a `pydantic.ValidationError`: ``"<where>: field <loc>: <msg> (got <input>)"``.

    Every problem of the error is listed, separated by ``"; "``, so the line names each bad field.
    ``allowed(loc)`` may return the keys accepted at ``loc``'s section (named for an unknown key).
    """
    parts = []
    for item in error.errors():
        loc = tuple(item.get("loc", ()))
        key = ".".join(str(p) for p in loc)
        kind = item.get("type")
        if kind == "extra_forbidden":
            keys = allowed(loc) if allowed is not None else []
            parts.append(f"field {key or '(top level)'}: unknown key" + (f" (allowed here: {', '.join(keys)})" if keys else ""))
        elif kind == "missing":
            parts.append(f"field {key or '(top level)'}: missing (required)")
        else:
            message = " ".join(str(item.get("msg", "")).removeprefix("Value error, ").split())
            got = repr(item.get("input"))
            got = got if len(got) <= 60 else got[:57] + "..."
            field = f"field {key}: " if key else ""  # a check of the whole model names its fields itself
            parts.append(f"{field}{message}" + (f" (got {got})" if kind != "value_error" else ""))
    return f"{where}: " + "; ".join(parts)
