"""Search strategies behind one ask/tell interface. They know member ids and
fitness values, never tensors or files."""
