"""Pure-torch attention machinery of the pack: one dispatcher per patch point, block discovery,
and one processor module per technique. Nothing here imports ComfyUI (DESIGN.md §1)."""
