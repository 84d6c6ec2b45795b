"""The command-line front ends: shyped, shypectl, shype-xl, the audit tool, the demo."""
