print("clonectl: not yet wired")
