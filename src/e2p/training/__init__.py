"""Training: the loop (`loop`: only the projector learns), the default recipe (`recipe`: style first, then the person
part, calibrated on validation users), scoring the calibration reads, DP-SGD (`privacy`), the shared LoRA adapter's
controls, checkpoints and multi-process set-up."""
