"""The one unknown-key check behind every config table, spec file and settings table (a leaf module:
the config classes of diffusion/ and models/ use it too, so it imports nothing of the package)."""

from __future__ import annotations


def refuse_unknown(given, known, where: str = "", error: type[Exception] = ValueError, what: str = "keys",
                   template: str | None = None) -> None:
    """Raise ``error("<where>: unknown key(s) [...]; known <what> are [...]")`` when ``given`` (a
    mapping or a collection of names) has a key outside ``known``. ``known`` is listed in its own
    order when it is a list or tuple, sorted otherwise. ``template`` (with ``{unknown}`` and
    ``{known}``) words the message differently where a caller's error text is established."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        listed = list(known) if isinstance(known, (list, tuple)) else sorted(known)
        if template is not None:
            raise error(template.format(unknown=unknown, known=listed))
        raise error(f"{where + ': ' if where else ''}unknown key(s) {unknown}; known {what} are {listed}")
