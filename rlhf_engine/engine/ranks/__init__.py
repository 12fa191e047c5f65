"""The engine's trainer on N torchrun ranks: the launcher (`launch`), each rank's entry (`run`) and the
channel a failing rank reports on (`failure`); rank 0 drives the others through `engine.driver`."""
