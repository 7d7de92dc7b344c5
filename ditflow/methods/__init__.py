"""The published methods, each an Intervention plus a driver."""
