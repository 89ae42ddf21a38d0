print("hydration-bench: placeholder")
