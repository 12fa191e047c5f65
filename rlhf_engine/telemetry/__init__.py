"""What a run reports: the metrics and timeline files (`files`), the step logger (`metrics`), the sinks it
feeds (`sinks`: TensorBoard, W&B) and the plots drawn from the files (`plots`)."""
