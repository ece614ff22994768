"""Stage 0, foundations every stage uses: where files go (`paths`), hashing, atomic files and locks, logging and
progress bars, seeds and devices, and the metrics (worst-group accuracy and friends). Imports no other calib stage."""
