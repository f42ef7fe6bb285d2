"""intforge.kernels: schedules and tensor intrinsics per target."""

from .cpu_default import default_schedule_pass

__all__ = ["default_schedule_pass"]
