"""Video models of the SIFAR, unified 2D/3D CNN, SIFA and IV-ViT families behind one interface."""
from contract.inputs import LAYOUTS
from models.registry import build, get_spec, list_models, register_model
from models.saved import load

__all__ = ["LAYOUTS", "build", "get_spec", "list_models", "load", "register_model"]
