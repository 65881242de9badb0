//! Typed access to the required Pick-a-Pic columns of a record batch, whatever arrow layout
//! (string, large string, view; float or integer labels) the shard was written with.

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;

use super::DatasetError;

const TEXT_TYPES: &str = "a string (Utf8, LargeUtf8 or Utf8View)";
const BINARY_TYPES: &str = "binary (Binary, LargeBinary or BinaryView)";
const NUMBER_TYPES: &str = "a float or integer";

/// Fail unless `column` has a type the reader accepts.
pub(super) fn check_column_type(
    file: &Path,
    column: &'static str,
    found: &DataType,
) -> Result<(), DatasetError> {
    let (ok, expected) = match column {
        "caption" => (
            matches!(
                found,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ),
            TEXT_TYPES,
        ),
        "jpg_0" | "jpg_1" => (
            matches!(
                found,
                DataType::Binary | DataType::LargeBinary | DataType::BinaryView
            ),
            BINARY_TYPES,
        ),
        _ => (
            matches!(found, DataType::Float32 | DataType::Float64) || found.is_integer(),
            NUMBER_TYPES,
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(type_error(file, column, found, expected))
    }
}

fn type_error(
    file: &Path,
    column: &'static str,
    found: &DataType,
    expected: &'static str,
) -> DatasetError {
    DatasetError::ColumnType {
        file: file.to_path_buf(),
        column,
        found: found.to_string(),
        expected,
    }
}

fn column<'a>(
    batch: &'a RecordBatch,
    file: &Path,
    name: &'static str,
) -> Result<&'a dyn Array, DatasetError> {
    batch
        .column_by_name(name)
        .map(|c| c.as_ref())
        .ok_or_else(|| DatasetError::MissingColumn {
            file: file.to_path_buf(),
            column: name,
        })
}

/// A string column of any of arrow's three layouts.
pub(super) enum TextColumn<'a> {
    Small(&'a arrow_array::StringArray),
    Large(&'a arrow_array::LargeStringArray),
    View(&'a arrow_array::StringViewArray),
}

impl<'a> TextColumn<'a> {
    pub(super) fn of(
        batch: &'a RecordBatch,
        file: &Path,
        name: &'static str,
    ) -> Result<Self, DatasetError> {
        let array = column(batch, file, name)?;
        if let Some(a) = array.as_string_opt::<i32>() {
            Ok(Self::Small(a))
        } else if let Some(a) = array.as_string_opt::<i64>() {
            Ok(Self::Large(a))
        } else if let Some(a) = array.as_string_view_opt() {
            Ok(Self::View(a))
        } else {
            Err(type_error(file, name, array.data_type(), TEXT_TYPES))
        }
    }

    pub(super) fn get(&self, i: usize) -> Option<&'a str> {
        match self {
            Self::Small(a) => a.is_valid(i).then(|| a.value(i)),
            Self::Large(a) => a.is_valid(i).then(|| a.value(i)),
            Self::View(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

/// A binary column of any of arrow's three layouts.
pub(super) enum BytesColumn<'a> {
    Small(&'a arrow_array::BinaryArray),
    Large(&'a arrow_array::LargeBinaryArray),
    View(&'a arrow_array::BinaryViewArray),
}

impl<'a> BytesColumn<'a> {
    pub(super) fn of(
        batch: &'a RecordBatch,
        file: &Path,
        name: &'static str,
    ) -> Result<Self, DatasetError> {
        let array = column(batch, file, name)?;
        if let Some(a) = array.as_binary_opt::<i32>() {
            Ok(Self::Small(a))
        } else if let Some(a) = array.as_binary_opt::<i64>() {
            Ok(Self::Large(a))
        } else if let Some(a) = array.as_binary_view_opt() {
            Ok(Self::View(a))
        } else {
            Err(type_error(file, name, array.data_type(), BINARY_TYPES))
        }
    }

    pub(super) fn get(&self, i: usize) -> Option<&'a [u8]> {
        match self {
            Self::Small(a) => a.is_valid(i).then(|| a.value(i)),
            Self::Large(a) => a.is_valid(i).then(|| a.value(i)),
            Self::View(a) => a.is_valid(i).then(|| a.value(i)),
        }
    }
}

/// A label column as `f64`s, whatever numeric type it is stored as.
pub(super) fn label_values(
    batch: &RecordBatch,
    file: &Path,
    name: &'static str,
) -> Result<Vec<Option<f64>>, DatasetError> {
    let array = column(batch, file, name)?;
    macro_rules! widen {
        ($($ty:ty),*) => {
            $(if let Some(a) = array.as_primitive_opt::<$ty>() {
                return Ok(a.iter().map(|v| v.map(|v| v as f64)).collect());
            })*
        };
    }
    widen!(
        Float64Type,
        Float32Type,
        Int64Type,
        Int32Type,
        Int16Type,
        Int8Type,
        UInt64Type,
        UInt32Type,
        UInt16Type,
        UInt8Type
    );
    Err(type_error(file, name, array.data_type(), NUMBER_TYPES))
}
