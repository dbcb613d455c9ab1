"""A plugin whose import fails, to check that the failure is shown, not swallowed."""

import this_module_does_not_exist  # noqa: F401
