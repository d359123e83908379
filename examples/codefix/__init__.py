"""The built-in `codefix` loop: write solution.py until py_compile and pytest pass."""
