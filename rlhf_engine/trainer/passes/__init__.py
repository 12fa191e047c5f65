"""How a batch's rows become forward passes: packing, shared-prompt rows, the pass layout and the
micro-batches of each rank."""
