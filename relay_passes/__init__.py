"""intforge's Relax passes: emit the integer program as Relax, lower requantization, verify integer-only."""

from .dot_product_layout import dot_product_layout_pass
from .emit import RelaxOps, emit_program
from .verify_integer_only import VerifyIntegerOnly, find_float_values, verify_integer_only

__all__ = ["dot_product_layout_pass", "RelaxOps", "emit_program",
           "VerifyIntegerOnly", "find_float_values", "verify_integer_only"]
