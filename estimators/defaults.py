"""Defaults the command line shows and the pipeline uses, in a module that imports nothing (the CLI shows its help
without importing torch)."""

# the training budget (epochs) of every step that trains, shared by `apply` and `estimate` (tasks.train)
FINETUNE_EPOCHS = 5

# seconds of timing `deployfit calibrate` spends by default (hardware.calibrate.calibrate_host; peaks and fits come
# on top: about 3 minutes in all on 2 cores, the command's start included)
CALIBRATION_BUDGET_S = 160.0
# the least compiled INT8 networks a full calibration times whatever its budget (hardware.calibrate.int8_samples):
# the graph's costs around the kernels (per call, per operator, per element moved, at two batches) are fitted on
# them, which one or two do not determine; six is what a pooled fit asks for (hardware.calibrate.samples.POOLED_LEAST)
INT8_LEAST_NETWORKS = 6
# the whole of a quick calibration (`deployfit calibrate --quick`, and the first use of `host` on a machine), start
# to written profile: timing, peaks and fits (hardware.calibrate.collect_samples keeps to it)
QUICK_CALIBRATION_S = 45.0
# seconds of exporting and timing networks that `calibrate --runtime onnxruntime` spends (hardware.calibrate.onnxrt;
# the fit takes a second more), and its quick one (the first use of `--runtime onnxruntime` on a machine)
ORT_CALIBRATION_S = 150.0
QUICK_ORT_CALIBRATION_S = 60.0
