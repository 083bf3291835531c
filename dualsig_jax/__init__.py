"""dualsig-jax."""
