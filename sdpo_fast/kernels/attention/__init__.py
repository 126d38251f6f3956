"""Shared-prefix attention: ``reference.py`` (torch), ``triton.py`` (kernels), ``launch.py`` (launchers)."""
