"""Whether a path is the user's own, as ssh decides for its keys.

The Numba kernel cache is unpickled at every start and the warm launcher's
socket is handed the user's environment and terminal: a directory on either
path that another user can write (or owns) lets that user run code as us.
Standard library only: the CLI asks before it loads Numba.
"""
from __future__ import annotations

import os
import stat


def path_problem(path: str, leaf_dir: bool = True) -> str | None:
    """None when ``path`` (existing or not yet created) and every directory
    above it, up to the user's home directory or ``/``, is owned by this
    user or root and writable by nobody else; else why not, one phrase.

    A sticky directory above (``/tmp``) is allowed, because the entry below
    it has already been checked to be ours and the sticky bit keeps others
    from renaming it; ``path`` itself never may be writable by others.
    ``leaf_dir``: ``path``, when it exists, must be a directory."""
    uid = os.geteuid()
    full = os.path.realpath(path)            # symlinks resolved: every real directory is checked
    home = os.path.realpath(os.path.expanduser("~"))
    cur, leaf = full, True
    while True:
        try:
            st = os.stat(cur)
        except FileNotFoundError:
            st = None                        # created later, by us, under what is checked here
        except OSError as exc:
            return f"{cur} cannot be examined ({exc.strerror})"
        if st is not None:
            if leaf and leaf_dir and not stat.S_ISDIR(st.st_mode):
                return f"{cur} is not a directory"
            if st.st_uid not in (uid, 0):
                return f"{cur} is owned by uid {st.st_uid}, not by uid {uid} or root"
            if st.st_mode & 0o022 and (leaf or not st.st_mode & stat.S_ISVTX):
                who = "others" if st.st_mode & 0o002 else "its group"
                return f"{cur} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
        leaf = False
        if cur == home or cur == os.path.dirname(cur):
            return None
        cur = os.path.dirname(cur)
