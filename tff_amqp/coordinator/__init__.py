"""The coordinator: runs TFF computations, sending client work to silos."""
