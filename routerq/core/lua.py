"""routerq's Redis scripts, kept as `.lua` files beside the modules that run them (as dramatiq keeps
`dispatch.lua`): readable and diffable as Lua, loaded once by name."""

from __future__ import annotations

import functools
from importlib.resources import files


@functools.cache
def lua_script(package: str, name: str, *prelude: str) -> str:
    """The text of `lua/<name>.lua` in `package`, after the `prelude` scripts (shared Lua functions)
    of the same folder, in order."""
    folder = files(package) / "lua"
    return "".join((folder / f"{part}.lua").read_text(encoding="utf-8") for part in (*prelude, name))
