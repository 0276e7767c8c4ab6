"""hyper2kvm matrix runner: many cells, reports, and the driver-pack gate."""
