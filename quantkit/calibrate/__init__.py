"""Stage 2, calibration: the calibration tokens run through the decoder layers one layer at a time, giving each
Linear's inputs, their Hessians (X^T X) and the next layer's inputs."""
