"""Imported by the multiprocessing fork server (see ``pool.py``) and nowhere else.

Importing sympy and math-verify and warming the ANTLR parser once, in the fork server,
means every worker forked from it, replacements for killed workers included, is ready
in milliseconds instead of seconds.
"""

from verifier import _mathcheck

try:
    _mathcheck.warm_up()
except Exception:  # an exception here would take the fork server down with it
    pass
