"""The one training loop (trainer) and what it needs: batch plans, weight files, the settings type,
the accelerate runtime and the memory plan."""
