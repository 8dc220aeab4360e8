"""fedbench's Hydra config tree. Importing it stores every method's defaults as `method_schema/NAME`,
which the method presets in `method/` extend."""

from fedbench.config import register_schemas

register_schemas()
