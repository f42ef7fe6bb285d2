"""intforge's Relax passes: emit the integer program as Relax, lower requantization, verify integer-only."""

from .emit import RelaxOps, emit_program
from .verify_integer_only import VerifyIntegerOnly, find_float_values, verify_integer_only

__all__ = ["RelaxOps", "emit_program", "VerifyIntegerOnly", "find_float_values", "verify_integer_only"]
