"""Interactive front ends: what the REPL and the notebook kernel show and how."""
